#!/usr/bin/env bash
# Pretrain Qwen3-235B-A22B on 4K-token samples (.bin/.idx from ../qwen3/data_convert_qwen3_pretrain.sh): the run of
# MindSpeed-LLM's examples/mcore/qwen3_moe pretrain script, as qtrain options (common.sh; docs/moe.md).
# Defaults: the 235B-A22B pretrain row of common.sh; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/model/Qwen3-235B-A22B DATA_PATH=/data/enwiki_text_document TOKENIZER_PATH=/model/Qwen3-235B-A22B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-235b_a22b bash examples/qwen3_moe/pretrain_qwen3_235b_a22b_4k.sh
# QTRAIN_TINY=1: a tiny MoE model on 2 CPU processes (gloo), seq 64, 4 iterations -- a smoke test.
MODEL_SIZE=235B-A22B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_moe_pretrain "$@"
