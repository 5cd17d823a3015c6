#!/usr/bin/env bash
# LoRA SFT (r 16, alpha 32) of Qwen3-32B on instruction data (from data_convert_qwen3_instruction.sh), 4K tokens.
# Defaults: 1 node(s) x 8 devices, TP1 PP1 (FSDP), full recompute, MBS 4, GBS 16; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/model/Qwen3-32B DATA_PATH=/data/alpaca TOKENIZER_PATH=/model/Qwen3-32B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-32b-lora bash examples/qwen3/tune_qwen3_32b_4k_lora.sh
MODEL_SIZE=32B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_sft lora --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "$@"
