#!/usr/bin/env bash
# Talk to a model: any Qwen3 size (the shape comes from the checkpoint), HF dir or qtrain checkpoint.
#   CKPT_LOAD_DIR=/data/ckpt/qwen3-1.7b TOKENIZER_PATH=/model/Qwen3-1.7B \
#   PROMPT="Give me a short introduction to large language models." bash examples/qwen3/generate_qwen3.sh
# Without PROMPT: an interactive chat in the terminal. MAX_NEW_TOKENS (default 256).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_generate "$@"
