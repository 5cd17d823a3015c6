#!/usr/bin/env bash
# Pretrain (continue) Qwen3-8B at 128K tokens per sample: YaRN RoPE scaling x4 from the 32,768
# positions it was trained with (as Qwen3's model card extends it to 131,072), context parallel over
# 8 devices (ring attention, zigzag balanced: 16K tokens per rank), documents split at EOD
# (--reset-attention-mask --reset-position-ids --eod-mask-loss; needs TOKENIZER_PATH), weights,
# gradients and Adam state sharded over the 8 CP ranks, every layer recomputed.
# Defaults: 1 node x 8 devices, TP1 PP1 CP8 (megatron_cp_algo), MBS 1, GBS 8; `qtrain plan` with the
# same flags gives the per-device memory. CP_ALGO=ulysses_cp_algo also fits (8 KV heads).
#   CKPT_LOAD_DIR=/model/Qwen3-8B DATA_PATH=/data/long_text_document TOKENIZER_PATH=/model/Qwen3-8B \
#   CKPT_SAVE_DIR=/data/ckpt/qwen3-8b-128k bash examples/qwen3/pretrain_qwen3_8b_128k.sh
# QTRAIN_TINY=1: a tiny model on 2 CPU processes (gloo, CP 2), seq 64, 4 iterations -- a smoke test.
MODEL_SIZE=8B
if [ "${QTRAIN_TINY:-0}" = 1 ]; then
  : "${CP:=2}" "${PP:=1}"
  ROPE=(--max-position-embeddings 256 --rope-scaling-original-max-position-embeddings 64)
else
  : "${SEQ_LENGTH:=131072}" "${CP:=8}" "${PP:=1}" "${GBS:=8}"
  ROPE=(--max-position-embeddings 131072 --rope-scaling-original-max-position-embeddings 32768)
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
qtrain_pretrain "${ROPE[@]}" --rope-scaling-type yarn --rope-scaling-factor 4 \
  --reset-attention-mask --reset-position-ids --eod-mask-loss \
  --use-distributed-optimizer --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "$@"
