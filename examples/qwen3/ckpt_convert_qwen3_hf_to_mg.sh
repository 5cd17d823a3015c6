#!/usr/bin/env bash
# HF weights -> Megatron / MindSpeed-LLM checkpoint (mcore names, split for TP/PP).
# TP and PP default to the pretrain recipe of MODEL_SIZE (default 1.7B); set them to match your training.
#   CKPT_LOAD_DIR=/model/Qwen3-8B CKPT_SAVE_DIR=/data/ckpt/qwen3-8b-mcore \
#   MODEL_SIZE=8B bash examples/qwen3/ckpt_convert_qwen3_hf_to_mg.sh
MODEL_SIZE=${MODEL_SIZE:-1.7B}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_convert hf mg "$@"
