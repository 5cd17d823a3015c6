#!/usr/bin/env bash
# Megatron / MindSpeed-LLM checkpoint (any TP/PP) -> HF weights (config.json + safetensors).
#   CKPT_LOAD_DIR=/data/ckpt/qwen3-8b-mcore CKPT_SAVE_DIR=/data/hf/qwen3-8b \
#   bash examples/qwen3/ckpt_convert_qwen3_mg_to_hf.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_convert mg hf "$@"
