#!/usr/bin/env bash
# HF weights -> Megatron / MindSpeed-LLM checkpoint of Qwen3-MoE (mcore names, split for TP/PP/EP, experts
# as --moe-grouped-gemm: what MindSpeed-LLM's convert_ckpt_v2.py --model-type-hf qwen3-moe writes).
# TP and PP default to the pretrain row of MODEL_SIZE (default 30B-A3B), EP to MindSpeed-LLM's training EP.
#   CKPT_LOAD_DIR=/model/Qwen3-30B-A3B CKPT_SAVE_DIR=/data/ckpt/qwen3-30b-a3b-mcore \
#   TP=1 PP=2 EP=8 bash examples/qwen3_moe/ckpt_convert_qwen3_moe_hf_to_mg.sh
MODEL_SIZE=${MODEL_SIZE:-30B-A3B}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_moe_convert hf mg "$@"
