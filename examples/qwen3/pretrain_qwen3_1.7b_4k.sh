#!/usr/bin/env bash
# Pretrain Qwen3-1.7B on 4K-token samples (.bin/.idx from data_convert_qwen3_pretrain.sh): the run of
# MindSpeed-LLM's pretrain_qwen3_1point7b_4K_ptd.sh (its flag groups, as qtrain options, are in
# common.sh's qtrain_pretrain; docs/flags.md lists every flag qtrain accepts).
# Defaults: 1 node(s) x 8 devices, TP1 PP1, MBS 1, GBS 32; variables and their meaning: README.md.
#   CKPT_LOAD_DIR=/model/Qwen3-1.7B DATA_PATH=/data/enwiki_text_document TOKENIZER_PATH=/model/Qwen3-1.7B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-1.7b bash examples/qwen3/pretrain_qwen3_1.7b_4k.sh
# CKPT_LOAD_DIR may be an HF model dir, a qtrain checkpoint or a Megatron / MindSpeed-LLM checkpoint
# (empty: random weights); when CKPT_SAVE_DIR already holds a checkpoint the run resumes from it.
# QTRAIN_TINY=1: a tiny model on 2 CPU processes (gloo), seq 64, 4 iterations -- a smoke test.
MODEL_SIZE=1.7B
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_pretrain "$@"
