#!/usr/bin/env bash
# Pretrain Qwen3-1.7B on 32K-token samples with context parallel: each sample's 32,768 tokens are split
# over CP 4 ranks (ring attention, zigzag balanced) x DP 2 on 1 node x 8 devices, every document of a
# sample attending only to itself (Megatron's --reset-attention-mask --reset-position-ids, split at
# the EOD tokens of data_convert_qwen3_pretrain.sh; needs TOKENIZER_PATH) and no loss on EOD inputs
# (--eod-mask-loss). Qwen3-1.7B's 40,960 positions cover 32K without RoPE scaling.
# Defaults: 1 node x 8 devices, TP1 PP1 CP4 (megatron_cp_algo), MBS 1, GBS 32, recompute full;
# CP_ALGO=ulysses_cp_algo (8 KV heads: CP <= 8) or hybrid_cp_algo ULYSSES_DEGREE=2 change the algorithm.
#   CKPT_LOAD_DIR=/model/Qwen3-1.7B DATA_PATH=/data/enwiki_text_document TOKENIZER_PATH=/model/Qwen3-1.7B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-1.7b-32k bash examples/qwen3/pretrain_qwen3_1.7b_32k.sh
# QTRAIN_TINY=1: a tiny model on 2 CPU processes (gloo, CP 2), seq 64, 4 iterations -- a smoke test.
MODEL_SIZE=1.7B
if [ "${QTRAIN_TINY:-0}" = 1 ]; then
  : "${CP:=2}"
else
  : "${SEQ_LENGTH:=32768}" "${CP:=4}"
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_pretrain --reset-attention-mask --reset-position-ids --eod-mask-loss \
  --use-distributed-optimizer --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "$@"
