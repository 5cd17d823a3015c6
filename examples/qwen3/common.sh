# examples/qwen3/common.sh: the launch logic shared by every script in this folder (sourced, not run).
#
# A script sets MODEL_SIZE (where the size matters), sources this file and calls one task function:
# qtrain_pretrain, qtrain_sft full|lora, qtrain_dpo full|lora, qtrain_generate, qtrain_evaluate,
# qtrain_convert, qtrain_preprocess.
# Every variable below can be set in the environment (or on the command line before `bash`);
# what is unset takes the published recipe's default for the size and task (table below).
#
#   NPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT    torchrun's layout (one line per node)
#   CKPT_LOAD_DIR   HF model dir, qtrain checkpoint or Megatron checkpoint to start from
#   CKPT_SAVE_DIR   where checkpoints go; a run whose CKPT_SAVE_DIR already holds one resumes from it
#   DATA_PATH       dataset prefix made by the data_convert_* scripts (weight/prefix pairs blend)
#   TOKENIZER_PATH  HF tokenizer dir (usually the HF model dir)
#   TP PP MBS GBS SEQ_LENGTH TRAIN_ITERS LR MIN_LR SAVE_INTERVAL LOG_INTERVAL
#   CP CP_ALGO      context parallel degree and algorithm (megatron_cp_algo ring, ulysses_cp_algo,
#                   hybrid_cp_algo with ULYSSES_DEGREE); given only when CP > 1
#   LOG_DIR LOG_FILE  the log (default logs/<script>.log, _node<N> added on several nodes); created if missing
#   PYTHON          interpreter that has qtrain installed (default python3)
#   DEVICE          cpu, cuda or npu (default: what qtrain finds)
#   QTRAIN_TINY=1        tiny model preset, 2 CPU processes (gloo), seq 64, 4 iterations: a smoke test
#   QTRAIN_PRINT_ONLY=1  print the command that would run, run nothing
# Arguments given to a script are appended to the qtrain command (they win over the defaults).

set -euo pipefail

# As in the published recipes: patient collective setup on Ascend, its allocator's expandable segments.
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}

# Published recipes (MindSpeed-LLM examples/mcore/qwen3, 4K sequence):
#   size  task      NPUS_PER_NODE NNODES TP PP MBS GBS
_QWEN3_RECIPES="
0.6B  pretrain  8 1 1 1 1 64
0.6B  full      8 1 1 1 1 16
0.6B  lora      8 1 1 1 1 16
1.7B  pretrain  8 1 1 1 1 32
1.7B  full      8 1 1 1 1 32
1.7B  lora      8 1 1 1 1 16
4B    pretrain  8 1 1 1 1 64
4B    full      8 1 1 1 1 16
4B    lora      8 1 1 1 1 16
8B    pretrain  8 1 1 2 1 64
8B    full      8 1 1 2 1 16
8B    lora      8 1 1 1 4 16
14B   pretrain  8 1 2 4 1 128
14B   full      8 1 8 1 1 16
14B   lora      8 1 1 1 4 64
32B   pretrain  8 2 8 2 1 128
32B   full      8 2 8 2 1 16
32B   lora      8 1 1 1 4 16
1.7B  dpo_full  8 1 1 1 1 32
1.7B  dpo_lora  8 1 1 1 1 32
8B    dpo_full  8 1 1 2 1 32
8B    dpo_lora  8 1 1 1 1 32
"
# (qtrain trains LoRA with data parallelism (FSDP) only: its lora rows keep MindSpeed-LLM's MBS and GBS
# on TP1 PP1, and the 8B/14B/32B LoRA scripts add full recompute to fit 64 GB devices. MindSpeed-LLM's
# lora layouts were 8B TP1 PP2, 14B TP2 PP2, 32B TP4 PP1.)
# (The dpo rows are qtrain's: MindSpeed-LLM 2.2.0 publishes a Qwen3 DPO script for the 30B-A3B MoE only.
# Its GBS 32 and MBS 1; layouts that fit 64 GB devices by `qtrain plan --stage dpo`.)

_die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }

# Fill unset variables with the recipe of (MODEL_SIZE, task); QTRAIN_TINY's values come first.
_qwen3_defaults() {
  local task=$1 row
  if [ "${QTRAIN_TINY:-0}" = 1 ]; then
    : "${NPUS_PER_NODE:=2}" "${NNODES:=1}" "${TP:=1}" "${PP:=1}" "${MBS:=1}" "${GBS:=4}"
    : "${SEQ_LENGTH:=64}" "${TRAIN_ITERS:=4}" "${DEVICE:=cpu}" "${LR:=1e-3}" "${MIN_LR:=1e-4}"
  fi
  if [ -n "${MODEL_SIZE:-}" ] && [ "$task" != none ]; then
    row=$(awk -v s="$MODEL_SIZE" -v t="$task" 'toupper($1) == toupper(s) && $2 == t' <<<"$_QWEN3_RECIPES")
    [ -n "$row" ] || _die "no recipe for MODEL_SIZE=$MODEL_SIZE and $task (sizes: 0.6B 1.7B 4B 8B 14B 32B)"
    read -r _ _ r_npus r_nnodes r_tp r_pp r_mbs r_gbs <<<"$row"
    : "${NPUS_PER_NODE:=$r_npus}" "${NNODES:=$r_nnodes}" "${TP:=$r_tp}" "${PP:=$r_pp}"
    : "${MBS:=$r_mbs}" "${GBS:=$r_gbs}"
  fi
  : "${NPUS_PER_NODE:=8}" "${NNODES:=1}" "${TP:=1}" "${PP:=1}" "${MBS:=1}"
  : "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
  : "${SEQ_LENGTH:=4096}" "${TRAIN_ITERS:=2000}"
  : "${SAVE_INTERVAL:=$TRAIN_ITERS}" "${LOG_INTERVAL:=1}"
}

# The ascend-toolkit environment, when this is an Ascend machine and nothing loaded it yet.
_ascend_env() {
  local f
  [ -n "${ASCEND_TOOLKIT_HOME:-}" ] && return 0
  for f in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    # shellcheck source=/dev/null  # vendor script, present only on Ascend machines
    if [ -f "$f" ]; then set +eu; source "$f"; set -eu; fi
  done
}

_log_file() {
  local name
  name=$(basename "$0" .sh)
  [ "${NNODES:-1}" -gt 1 ] && name="${name}_node${NODE_RANK:-0}"
  LOG_FILE=${LOG_FILE:-${LOG_DIR:-logs}/${name}.log}
}

# The command as one line a user can paste back into a shell.
_show() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}

# Run a command with its output on the terminal and appended to LOG_FILE (a restarted job keeps
# the earlier lines). SIGTERM/SIGINT are passed on to it, so that a platform stopping the job (or
# Ctrl-C) reaches torchrun and qtrain saves a checkpoint before exiting, also when this shell is
# the container's PID 1. The exit status is the command's.
_run_logged() {
  local pid tee_pid logfd status=0
  if [ "${QTRAIN_PRINT_ONLY:-0}" = 1 ]; then
    _show "$@"
    return 0
  fi
  _ascend_env
  _log_file
  mkdir -p "$(dirname "$LOG_FILE")"
  {
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) node ${NODE_RANK:-0}: $(basename "$0")"
    _show "$@"
  } >>"$LOG_FILE"
  echo "$(basename "$0"): log: $LOG_FILE"
  # tee ignores the stop signals (Slurm sends them to every process): it must outlive the run's last lines.
  exec {logfd}> >(trap '' TERM INT; exec tee -a "$LOG_FILE")
  tee_pid=$!
  "$@" >&"$logfd" 2>&1 &
  pid=$!
  trap 'echo "$(basename "$0"): stop requested: passing SIGTERM on (a checkpoint is saved first)" >&2
        kill -TERM "$pid" 2>/dev/null || true' TERM INT
  while :; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupted wait: the command still runs
  done
  trap - TERM INT
  exec {logfd}>&-
  wait "$tee_pid" 2>/dev/null || true
  return "$status"
}

_py() { echo "${PYTHON:-python3}"; }

# One process per device on every node: torchrun running `python -m qtrain <command>`.
_torchrun() {
  _run_logged "$(_py)" -m torch.distributed.run \
    --nproc_per_node "$NPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m qtrain "$@"
}

# One process: commands that are not distributed (preprocess, convert, generate, evaluate).
_single() { _run_logged "$(_py)" -m qtrain "$@"; }

_require() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || _die "set $name (see examples/qwen3/README.md), e.g. $name=/path bash $0"
  done
}

_model_args() {
  MODEL_ARGS=(--model-preset "$([ "${QTRAIN_TINY:-0}" = 1 ] && echo tiny || echo "$MODEL_SIZE")")
  [ -n "${TOKENIZER_PATH:-}" ] && MODEL_ARGS+=(--tokenizer-name-or-path "$TOKENIZER_PATH")
  [ -n "${DEVICE:-}" ] && MODEL_ARGS+=(--device "$DEVICE")
  [ "${QTRAIN_TINY:-0}" = 1 ] || MODEL_ARGS+=(--bf16)
  return 0
}

# Resume from CKPT_SAVE_DIR when it holds a checkpoint (a restarted platform job goes on where it
# stopped); otherwise start from the weights in CKPT_LOAD_DIR (HF dir, or a checkpoint: weights only).
_load_args() {
  LOAD_ARGS=()
  if [ -f "$CKPT_SAVE_DIR/latest_checkpointed_iteration.txt" ]; then
    echo "$(basename "$0"): resuming from $CKPT_SAVE_DIR (iteration $(cat "$CKPT_SAVE_DIR/latest_checkpointed_iteration.txt"))"
    LOAD_ARGS=(--load "$CKPT_SAVE_DIR")
  elif [ -n "${CKPT_LOAD_DIR:-}" ]; then
    LOAD_ARGS=(--load "$CKPT_LOAD_DIR")
    [ -f "$CKPT_LOAD_DIR/latest_checkpointed_iteration.txt" ] && LOAD_ARGS+=(--finetune)
  fi
  return 0
}

_train_args() {
  local data
  read -ra data <<<"$DATA_PATH"  # one prefix, or "weight prefix weight prefix ..." to blend
  # shellcheck disable=SC2054  # "100,0,0" is one value
  TRAIN_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --micro-batch-size "$MBS" --global-batch-size "$GBS"
    --seq-length "$SEQ_LENGTH" --train-iters "$TRAIN_ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction 0.01
    --weight-decay 1e-1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
    --init-method-std 0.01 --seed 42
    --data-path "${data[@]}" --split 100,0,0
    --save "$CKPT_SAVE_DIR" --save-interval "$SAVE_INTERVAL"
    --log-interval "$LOG_INTERVAL" --eval-interval "$TRAIN_ITERS" --eval-iters 0
  )
  if [ "${CP:-1}" -gt 1 ]; then
    TRAIN_ARGS+=(--context-parallel-size "$CP" --context-parallel-algo "${CP_ALGO:-megatron_cp_algo}")
    [ -n "${ULYSSES_DEGREE:-}" ] && TRAIN_ARGS+=(--ulysses-degree-in-cp "$ULYSSES_DEGREE")
  fi
  return 0
}

# qtrain_pretrain [extra qtrain pretrain args]
qtrain_pretrain() {
  _qwen3_defaults pretrain
  : "${LR:=1.25e-6}" "${MIN_LR:=1.25e-7}"
  _require MODEL_SIZE DATA_PATH CKPT_SAVE_DIR
  _model_args; _load_args; _train_args
  _torchrun pretrain "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${LOAD_ARGS[@]}" "$@"
}

# qtrain_sft full|lora [extra qtrain sft args]: DATA_PATH is the --output-prefix of
# data_convert_qwen3_instruction.sh (the chat template was applied there).
qtrain_sft() {
  local kind=$1; shift
  local lora=() targets
  _qwen3_defaults "$kind"
  case $kind in
    full) : "${LR:=1.25e-6}" "${MIN_LR:=1.25e-7}" ;;
    lora) : "${LR:=1.25e-5}" "${MIN_LR:=1.25e-7}"
          read -ra targets <<<"${LORA_TARGET_MODULES:-q_proj k_proj v_proj o_proj gate_proj up_proj down_proj}"
          lora=(--lora-r "${LORA_R:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lora-target-modules "${targets[@]}") ;;
    *) _die "qtrain_sft takes full or lora, not '$kind'" ;;
  esac
  _require MODEL_SIZE DATA_PATH CKPT_SAVE_DIR
  _model_args; _load_args; _train_args
  _torchrun sft "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${LOAD_ARGS[@]}" "${lora[@]}" "$@"
}

# qtrain_dpo full|lora [extra qtrain dpo args]: preference training (DPO, sigmoid loss, beta DPO_BETA)
# on DATA_PATH, the --output-prefix of data_convert_qwen3_pairwise.sh, from CKPT_LOAD_DIR (the SFT model,
# also the frozen reference; with LoRA the reference is the base model with the adapters off).
# Parameters, gradients, optimizer state and the reference copy are sharded over the data-parallel
# ranks (--use-distributed-optimizer).
qtrain_dpo() {
  local kind=$1; shift
  local lora=() targets
  _qwen3_defaults "dpo_$kind"
  case $kind in
    full) : "${LR:=5e-7}" "${MIN_LR:=0}" ;;
    lora) : "${LR:=5e-6}" "${MIN_LR:=0}"
          read -ra targets <<<"${LORA_TARGET_MODULES:-q_proj k_proj v_proj o_proj gate_proj up_proj down_proj}"
          lora=(--lora-r "${LORA_R:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lora-target-modules "${targets[@]}") ;;
    *) _die "qtrain_dpo takes full or lora, not '$kind'" ;;
  esac
  _require MODEL_SIZE DATA_PATH CKPT_SAVE_DIR
  _model_args; _load_args; _train_args
  _torchrun dpo "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${LOAD_ARGS[@]}" --use-distributed-optimizer \
    --dpo-loss-type "${DPO_LOSS_TYPE:-sigmoid}" --dpo-beta "${DPO_BETA:-0.1}" "${lora[@]}" "$@"
}

# qtrain_convert FROM TO [extra qtrain convert args]: FROM/TO are hf, mg (Megatron / MindSpeed-LLM)
# or qtrain. Writing mg uses the TP/PP of the size's pretrain recipe, as MindSpeed-LLM expects.
qtrain_convert() {
  local from=$1 to=$2; shift 2
  local layout=()
  _qwen3_defaults "$([ "$to" = mg ] && echo pretrain || echo none)"
  _require CKPT_LOAD_DIR CKPT_SAVE_DIR
  [ "$to" = mg ] && layout=(--target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP")
  _single convert --load-model-type "$from" --save-model-type "$to" \
    --load-dir "$CKPT_LOAD_DIR" --save-dir "$CKPT_SAVE_DIR" "${layout[@]}" "$@"
}

# qtrain_preprocess pretrain|instruction|pairwise [extra qtrain preprocess args]: INPUT (file, directory
# or glob of parquet/jsonl/json/csv/txt/arrow), OUTPUT_PREFIX, TOKENIZER_PATH, WORKERS, MAP_KEYS.
qtrain_preprocess() {
  local kind=$1; shift
  local handler=() keys
  _qwen3_defaults none
  _require INPUT OUTPUT_PREFIX TOKENIZER_PATH
  case $kind in
    pretrain) read -ra keys <<<"${JSON_KEYS:-text}"
              handler=(--handler-name GeneralPretrainHandler --json-keys "${keys[@]}" --append-eod) ;;
    instruction)
      # MindSpeed-LLM's template; samples longer than the training SEQ_LENGTH are cut to SEQ_LENGTH - 1
      # tokens as MindSpeed-LLM cuts them (and counted). PACK=1 packs with per-sample masks (--neat-pack).
      handler=(--handler-name "${HANDLER_NAME:-AlpacaStyleInstructionHandler}" --prompt-type qwen3
               --seq-length "$SEQ_LENGTH")
      [ "${PACK:-0}" = 1 ] && handler+=(--pack --neat-pack)
      [ "${ENABLE_THINKING:-0}" = 1 ] && handler+=(--enable-thinking true) ;;
    pairwise)
      # Preference pairs (prompt + chosen + rejected); a pair with a side of SEQ_LENGTH tokens or more is dropped.
      handler=(--handler-name "${HANDLER_NAME:-AlpacaStylePairwiseHandler}" --prompt-type qwen3
               --seq-length "$SEQ_LENGTH")
      [ "${ENABLE_THINKING:-0}" = 1 ] && handler+=(--enable-thinking true) ;;
    *) _die "qtrain_preprocess takes pretrain, instruction or pairwise, not '$kind'" ;;
  esac
  [ -n "${MAP_KEYS:-}" ] && handler+=(--map-keys "$MAP_KEYS")
  [ "${QTRAIN_PRINT_ONLY:-0}" = 1 ] || mkdir -p "$(dirname "$OUTPUT_PREFIX")"
  _single preprocess --input "$INPUT" --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --tokenizer-type PretrainedFromHF --output-prefix "$OUTPUT_PREFIX" "${handler[@]}" \
    --workers "${WORKERS:-$([ "${QTRAIN_TINY:-0}" = 1 ] && echo 1 || echo 4)}" --log-interval 1000 "$@"
}

# qtrain_generate [extra qtrain generate args]: CKPT_LOAD_DIR (HF dir or qtrain checkpoint),
# PROMPT, MAX_NEW_TOKENS; without PROMPT, an interactive chat in the terminal.
qtrain_generate() {
  local prompt=()
  _qwen3_defaults none
  _require CKPT_LOAD_DIR
  [ -n "${PROMPT:-}" ] && prompt=(--prompt "$PROMPT")
  [ -n "${TOKENIZER_PATH:-}" ] && prompt+=(--tokenizer-name-or-path "$TOKENIZER_PATH")
  [ -n "${DEVICE:-}" ] && prompt+=(--device "$DEVICE")
  _single generate --load "$CKPT_LOAD_DIR" --max-new-tokens "${MAX_NEW_TOKENS:-256}" "${prompt[@]}" "$@"
}

# qtrain_evaluate [extra qtrain evaluate args]: CKPT_LOAD_DIR plus EVAL_DATA_PATH (a directory of
# MMLU/CEval-format CSV files; TASK names the format) and/or DATA_PATH (perplexity on .bin/.idx).
qtrain_evaluate() {
  local what=()
  _qwen3_defaults none
  _require CKPT_LOAD_DIR
  [ -n "${EVAL_DATA_PATH:-}" ] && what+=(--data-dir "$EVAL_DATA_PATH" --task "${TASK:-mmlu}")
  [ -n "${DATA_PATH:-}" ] && what+=(--data-path "$DATA_PATH" --seq-length "$SEQ_LENGTH")
  [ ${#what[@]} -gt 0 ] || _die "set EVAL_DATA_PATH (MMLU/CEval CSV dir) or DATA_PATH (perplexity)"
  [ -n "${TOKENIZER_PATH:-}" ] && what+=(--tokenizer-name-or-path "$TOKENIZER_PATH")
  [ -n "${DEVICE:-}" ] && what+=(--device "$DEVICE")
  _single evaluate --load "$CKPT_LOAD_DIR" "${what[@]}" "$@"
}
