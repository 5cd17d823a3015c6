#!/usr/bin/env bash
# Preference pairs (Alpaca records with "chosen" and "rejected" answers, or ShareGPT conversations ending
# with a user turn plus "chosen"/"rejected" replies) -> DPO dataset with the Qwen3 chat template (MindSpeed-
# LLM's layout: four datasets, prompt tokens masked out), for every Qwen3 size.
#   INPUT=/data/pairs.jsonl TOKENIZER_PATH=/model/Qwen3-1.7B OUTPUT_PREFIX=/data/dataset/pairs \
#   bash examples/qwen3/data_convert_qwen3_pairwise.sh
# then train with DATA_PATH=/data/dataset/pairs (dpo_qwen3_*.sh). HANDLER_NAME=SharegptStylePairwiseHandler
# for ShareGPT files; MAP_KEYS='{"system": "system", "history": "history"}' reads those fields; SEQ_LENGTH
# (default 4096) must be the training one. A sample set: qtrain/assets/sample_preference.jsonl. See
# docs/preference.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_preprocess pairwise "$@"
