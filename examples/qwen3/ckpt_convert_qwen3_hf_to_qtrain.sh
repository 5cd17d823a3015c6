#!/usr/bin/env bash
# HF weights -> qtrain checkpoint (torch.distributed.checkpoint; any layout can load it).
# Optional: qtrain pretrain/sft also start from an HF dir directly.
#   CKPT_LOAD_DIR=/model/Qwen3-8B CKPT_SAVE_DIR=/data/ckpt/qwen3-8b-qtrain \
#   bash examples/qwen3/ckpt_convert_qwen3_hf_to_qtrain.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_convert hf qtrain "$@"
