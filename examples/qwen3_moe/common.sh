# examples/qwen3_moe/common.sh: Qwen3-MoE (30B-A3B, 235B-A22B) on top of examples/qwen3/common.sh
# (sourced, not run). Same variables and task functions (see ../qwen3/common.sh and README.md), plus
#   EP               expert-parallel size: of training (--expert-model-parallel-size; EP neighbouring
#                    data-parallel ranks split the experts) and of Megatron output in the convert scripts.
#                    Default MindSpeed-LLM's: 8 for 30B-A3B, 32 for 235B-A22B; LoRA runs EP 1
#   GROUPED_GEMM=0   Megatron experts per expert (local_experts.N) instead of --moe-grouped-gemm
#   RECOMPUTE=none   no activation recomputation (default: full, one layer at a time, as MindSpeed-LLM)

# shellcheck source=../qwen3/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../qwen3/common.sh"

# Layouts: MindSpeed-LLM's node counts, MBS, GBS and EP (examples/mcore/qwen3_moe, 4K); TP 1 (qtrain's
# expert parallelism does not combine with TP yet) and PP from `qtrain plan --suggest` with FSDP and
# full recompute on 64 GB devices (30B-A3B at 16 devices: 35-39 GiB per device; 235B-A22B at 256: 29 GiB).
#   size       task      NPUS_PER_NODE NNODES TP PP MBS GBS
_QWEN3_RECIPES="
30B-A3B    pretrain  8  2  1 1 1 256
30B-A3B    full      8  2  1 1 4 64
30B-A3B    lora      8  1  1 1 8 64
235B-A22B  pretrain  16 16 1 2 1 1024
235B-A22B  full      16 16 1 2 1 1024
235B-A22B  lora      16 16 1 2 1 256
"
# MindSpeed-LLM's expert-parallel size of each model's training (also what Megatron output is split for)
_moe_ep() { case ${MODEL_SIZE^^} in 30B-A3B) echo 8 ;; 235B-A22B) echo 32 ;; *) echo 1 ;; esac; }

# The tiny preset of QTRAIN_TINY=1 is a MoE one.
_model_args() {
  MODEL_ARGS=(--model-preset "$([ "${QTRAIN_TINY:-0}" = 1 ] && echo "${TINY_PRESET:-tiny-moe}" || echo "$MODEL_SIZE")")
  [ -n "${TOKENIZER_PATH:-}" ] && MODEL_ARGS+=(--tokenizer-name-or-path "$TOKENIZER_PATH")
  [ -n "${DEVICE:-}" ] && MODEL_ARGS+=(--device "$DEVICE")
  [ "${QTRAIN_TINY:-0}" = 1 ] || MODEL_ARGS+=(--bf16)
  return 0
}

# What every MoE training run adds: FSDP, expert parallelism (QTRAIN_TINY: 2, over its 2 processes; LoRA:
# 1), recompute, MindSpeed-LLM's load-balancing loss.
_moe_train_args() {
  local ep=${EP:-$([ "${QTRAIN_TINY:-0}" = 1 ] && echo 2 || _moe_ep)}
  [ "${1:-}" = lora ] && ep=${EP:-1}
  MOE_ARGS=(--use-distributed-optimizer --expert-model-parallel-size "$ep"
            --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.001)
  [ "${RECOMPUTE:-full}" = full ] && MOE_ARGS+=(--recompute-granularity full --recompute-method uniform
                                                --recompute-num-layers 1)
  return 0
}

# qtrain_moe_pretrain / qtrain_moe_sft full|lora [extra args]: the dense functions with MOE_ARGS first
# (arguments given to the script still come last and win).
qtrain_moe_pretrain() { _moe_train_args; qtrain_pretrain "${MOE_ARGS[@]}" "$@"; }
qtrain_moe_sft() { local kind=$1; shift; _moe_train_args "$kind"; qtrain_sft "$kind" "${MOE_ARGS[@]}" "$@"; }

# qtrain_moe_convert FROM TO [extra args]: Megatron output split for TP/PP of the pretrain recipe and
# EP of MindSpeed-LLM's training, experts as --moe-grouped-gemm (GROUPED_GEMM=0: per expert).
qtrain_moe_convert() {
  local from=$1 to=$2; shift 2
  local extra=()
  if [ "$to" = mg ]; then
    extra=(--target-expert-parallel-size "${EP:-$(_moe_ep)}")
  fi
  if [ "$to" = mg ] || [ "$from" = mg ]; then
    [ "${GROUPED_GEMM:-1}" = 1 ] && extra+=(--moe-grouped-gemm)
  fi
  qtrain_convert "$from" "$to" "${extra[@]}" --model-type-hf qwen3-moe "$@"
}
