#!/usr/bin/env bash
# LoRA (r 16, alpha 32; attention and experts) SFT of Qwen3-235B-A22B on instruction data (from ../qwen3/data_convert_qwen3_instruction.sh), 4K tokens.
# Defaults: the 235B-A22B lora row of common.sh; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/model/Qwen3-235B-A22B DATA_PATH=/data/alpaca TOKENIZER_PATH=/model/Qwen3-235B-A22B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-235b_a22b-lora bash examples/qwen3_moe/tune_qwen3_235b_a22b_4k_lora.sh
MODEL_SIZE=235B-A22B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_moe_sft lora "$@"
