#!/usr/bin/env bash
# Raw corpus -> pretraining dataset (.bin/.idx, Megatron format), for every Qwen3 size (one tokenizer).
#   INPUT=/data/enwiki/train-00000-of-00042.parquet TOKENIZER_PATH=/model/Qwen3-1.7B \
#   OUTPUT_PREFIX=/data/dataset/enwiki bash examples/qwen3/data_convert_qwen3_pretrain.sh
# writes /data/dataset/enwiki_text_document.{bin,idx}: use DATA_PATH=/data/dataset/enwiki_text_document.
# JSON_KEYS (default text) names the column(s); WORKERS (default 4) the tokenizer processes.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_preprocess pretrain "$@"
