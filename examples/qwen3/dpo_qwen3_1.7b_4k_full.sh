#!/usr/bin/env bash
# Full DPO (sigmoid loss, beta 0.1) of Qwen3-1.7B on preference pairs (data_convert_qwen3_pairwise.sh),
# 4K tokens, from CKPT_LOAD_DIR: the SFT model, also the frozen reference.
# Defaults: 1 node(s) x 8 devices, TP1 PP1, MBS 1, GBS 32; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/data/hf/qwen3-1.7b-sft DATA_PATH=/data/dataset/pairs TOKENIZER_PATH=/model/Qwen3-1.7B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-1.7b-dpo-full bash examples/qwen3/dpo_qwen3_1.7b_4k_full.sh
MODEL_SIZE=1.7B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_dpo full "$@"
