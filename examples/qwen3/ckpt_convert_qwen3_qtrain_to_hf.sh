#!/usr/bin/env bash
# qtrain checkpoint (the latest in CKPT_LOAD_DIR) -> HF weights, to serve with vLLM / MindIE / transformers.
#   CKPT_LOAD_DIR=/data/ckpt/qwen3-8b CKPT_SAVE_DIR=/data/hf/qwen3-8b-trained \
#   bash examples/qwen3/ckpt_convert_qwen3_qtrain_to_hf.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_convert qtrain hf "$@"
