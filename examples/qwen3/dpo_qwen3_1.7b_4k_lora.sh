#!/usr/bin/env bash
# LoRA DPO (r 16, alpha 32; sigmoid loss, beta 0.1) of Qwen3-1.7B on preference pairs, 4K tokens,
# from CKPT_LOAD_DIR: the SFT model; the reference is that base with the adapters off.
# Defaults: 1 node(s) x 8 devices, TP1 PP1, MBS 1, GBS 32; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/data/hf/qwen3-1.7b-sft DATA_PATH=/data/dataset/pairs TOKENIZER_PATH=/model/Qwen3-1.7B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-1.7b-dpo-lora bash examples/qwen3/dpo_qwen3_1.7b_4k_lora.sh
MODEL_SIZE=1.7B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_dpo lora "$@"
