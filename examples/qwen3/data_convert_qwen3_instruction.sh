#!/usr/bin/env bash
# Instruction data (Alpaca or ShareGPT format) -> SFT dataset with the Qwen3 chat template, prompt
# tokens masked out of the loss; for every Qwen3 size (one tokenizer).
#   INPUT=/data/alpaca/train-00000-of-00001.parquet TOKENIZER_PATH=/model/Qwen3-1.7B \
#   OUTPUT_PREFIX=/data/dataset/alpaca bash examples/qwen3/data_convert_qwen3_instruction.sh
# then train with DATA_PATH=/data/dataset/alpaca. HANDLER_NAME=SharegptStyleInstructionHandler for
# ShareGPT files; SEQ_LENGTH (default 4096) must be the training one: longer samples are cut as
# MindSpeed-LLM cuts them; PACK=1 packs samples into SEQ_LENGTH-token rows (--pack --neat-pack);
# ENABLE_THINKING=1 trains on the think block (--enable-thinking true). See docs/sft.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_preprocess instruction "$@"
