#!/usr/bin/env bash
# Full SFT of Qwen3-30B-A3B on instruction data (from ../qwen3/data_convert_qwen3_instruction.sh), 4K tokens.
# Defaults: the 30B-A3B full row of common.sh; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/model/Qwen3-30B-A3B DATA_PATH=/data/alpaca TOKENIZER_PATH=/model/Qwen3-30B-A3B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-30b_a3b-full bash examples/qwen3_moe/tune_qwen3_30b_a3b_4k_full.sh
MODEL_SIZE=30B-A3B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_moe_sft full "$@"
