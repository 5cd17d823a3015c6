#!/usr/bin/env bash
# Full DPO (sigmoid loss, beta 0.1) of Qwen3-8B on preference pairs (data_convert_qwen3_pairwise.sh),
# 4K tokens, full recompute, from CKPT_LOAD_DIR: the SFT model, also the frozen reference.
# Defaults: 1 node(s) x 8 devices, TP1 PP2, MBS 1, GBS 32; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/data/hf/qwen3-8b-sft DATA_PATH=/data/dataset/pairs TOKENIZER_PATH=/model/Qwen3-8B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-8b-dpo-full bash examples/qwen3/dpo_qwen3_8b_4k_full.sh
MODEL_SIZE=8B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_dpo full --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "$@"
