#!/usr/bin/env bash
# Measure a model: any Qwen3 size (the shape comes from the checkpoint), HF dir or qtrain checkpoint.
#   CKPT_LOAD_DIR=/data/ckpt/qwen3-1.7b TOKENIZER_PATH=/model/Qwen3-1.7B \
#   EVAL_DATA_PATH=/data/mmlu/test TASK=mmlu bash examples/qwen3/evaluate_qwen3.sh     # accuracy
#   ... DATA_PATH=/data/dataset/enwiki_text_document bash examples/qwen3/evaluate_qwen3.sh  # perplexity
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_evaluate "$@"
