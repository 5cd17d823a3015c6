#!/usr/bin/env bash
# Megatron / MindSpeed-LLM checkpoint of Qwen3-MoE (any TP/PP/EP, experts grouped: GROUPED_GEMM=0 for
# per-expert files) -> HF weights. HF_CFG_DIR: the original HF model dir, whose config.json (top-k,
# norm_topk_prob, rope_theta) a MindSpeed-LLM checkpoint does not record.
#   CKPT_LOAD_DIR=/data/ckpt/qwen3-30b-a3b-mcore CKPT_SAVE_DIR=/data/qwen3-30b-a3b-hf \
#   HF_CFG_DIR=/model/Qwen3-30B-A3B bash examples/qwen3_moe/ckpt_convert_qwen3_moe_mg_to_hf.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
extra=()
[ -n "${HF_CFG_DIR:-}" ] && extra=(--hf-cfg-dir "$HF_CFG_DIR")
qtrain_moe_convert mg hf "${extra[@]}" "$@"
