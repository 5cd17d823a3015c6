#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the default job: preprocess the bundled corpus with the real
# Qwen3 tokenizer, train a tiny Qwen3 on CPU, save, export to HF, generate, plot the loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qtrain demo "$@"
