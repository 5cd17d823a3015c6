#!/usr/bin/env bash
# Pretrain Qwen3-14B on 4K-token samples (.bin/.idx from data_convert_qwen3_pretrain.sh).
# Defaults: 1 node(s) x 8 devices, TP2 PP4, MBS 1, GBS 128; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/model/Qwen3-14B DATA_PATH=/data/enwiki_text_document TOKENIZER_PATH=/model/Qwen3-14B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-14b bash examples/qwen3/pretrain_qwen3_14b_4k.sh
MODEL_SIZE=14B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_pretrain "$@"
