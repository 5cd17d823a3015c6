#!/bin/bash
# Pretrain Qwen3-1.7B on 4K-token samples with qtrain: the argument groups of MindSpeed-LLM's
# examples/mcore/qwen3/pretrain_qwen3_1point7b_4K_ptd.sh, launched with torchrun.
#
#   CKPT_LOAD_DIR=/model/Qwen3-1.7B TOKENIZER_PATH=/model/Qwen3-1.7B \
#   DATA_PATH=/data/enwiki_text_document CKPT_SAVE_DIR=/data/ckpt/qwen3-1.7b \
#   bash examples/qwen3/pretrain_qwen3_1.7b_4k.sh
#
# CKPT_LOAD_DIR may be an HF model dir (start from its weights), a qtrain checkpoint or a
# Megatron/MindSpeed-LLM checkpoint; leave it empty to start from random weights. When
# CKPT_SAVE_DIR already holds a checkpoint the run resumes from it.
# QTRAIN_TINY=1: a tiny model on 2 CPU processes (gloo), seq 64, 4 iterations -- a smoke test.
# Every variable may be set in the environment; extra arguments are appended to the command.
set -euo pipefail

export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NPU_ASD_ENABLE=${NPU_ASD_ENABLE:-0}

QTRAIN_TINY=${QTRAIN_TINY:-0}
if [ "$QTRAIN_TINY" = 1 ]; then
    : "${NPUS_PER_NODE:=2}" "${TP:=1}" "${PP:=1}" "${MBS:=1}" "${GBS:=4}" "${SEQ_LENGTH:=64}" "${TRAIN_ITERS:=4}"
fi

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

# please fill these path configurations
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:?set CKPT_SAVE_DIR, the checkpoint directory}
DATA_PATH=${DATA_PATH:?set DATA_PATH, a dataset prefix from qtrain preprocess (or weight prefix pairs)}
TOKENIZER_PATH=${TOKENIZER_PATH:-}

TP=${TP:-1}
PP=${PP:-1}
MBS=${MBS:-1}
GBS=${GBS:-32}
SEQ_LENGTH=${SEQ_LENGTH:-4096}
TRAIN_ITERS=${TRAIN_ITERS:-2000}
PYTHON=${PYTHON:-python3}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

OPTIMIZE_ARGS="
    --use-flash-attn \
    --use-fused-rotary-pos-emb \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-masked-softmax-fusion \
    --use-distributed-optimizer
"

TRAIN_ARGS="
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --lr 1.25e-6 \
    --lr-decay-style cosine \
    --min-lr 1.25e-7 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --attention-dropout 0.0 \
    --init-method-std 0.01 \
    --hidden-dropout 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 4096 \
    --seed 42 \
    --train-iters ${TRAIN_ITERS} \
    --seq-length ${SEQ_LENGTH} \
    --no-shared-storage
"

MODEL_PARALLEL_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP}
"

GPT_ARGS="
    --use-mcore-models \
    --spec mindspeed_llm.tasks.models.spec.qwen3_spec layer_spec \
    --kv-channels 128 \
    --qk-layernorm \
    --norm-topk-prob \
    --max-position-embeddings ${SEQ_LENGTH} \
    --num-layers 28 \
    --hidden-size 2048 \
    --ffn-hidden-size 6144 \
    --num-attention-heads 16 \
    --tokenizer-type PretrainedFromHF \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 151936 \
    --rotary-base 1000000 \
    --disable-bias-linear \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --swiglu \
    --attention-softmax-in-fp32 \
    --no-gradient-accumulation-fusion \
    --group-query-attention \
    --num-query-groups 8
"
PRECISION_ARGS="--bf16"
if [ "$QTRAIN_TINY" = 1 ]; then
    # The tiny preset's shape instead of 1.7B's (same flags, small numbers), fp32 on CPU.
    GPT_ARGS="$GPT_ARGS --model-preset tiny --num-layers 2 --hidden-size 128 --ffn-hidden-size 384
        --num-attention-heads 4 --num-query-groups 2 --kv-channels 32 --padded-vocab-size 1024 --device cpu"
    PRECISION_ARGS=""
fi
[ -n "$TOKENIZER_PATH" ] && GPT_ARGS="$GPT_ARGS --tokenizer-name-or-path $TOKENIZER_PATH"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 100,0,0
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 0 \
    --no-load-optim \
    --no-load-rng
"

# Resume from CKPT_SAVE_DIR when it holds a checkpoint, else start from CKPT_LOAD_DIR's weights.
LOAD_ARGS=""
if [ -f "$CKPT_SAVE_DIR/latest_checkpointed_iteration.txt" ]; then
    LOAD_ARGS="--load $CKPT_SAVE_DIR"
    OUTPUT_ARGS=${OUTPUT_ARGS/--no-load-optim/}
    OUTPUT_ARGS=${OUTPUT_ARGS/--no-load-rng/}
elif [ -n "$CKPT_LOAD_DIR" ]; then
    LOAD_ARGS="--load $CKPT_LOAD_DIR"
fi

mkdir -p logs
# shellcheck disable=SC2086  # the *_ARGS strings are word lists, as in the MindSpeed-LLM script
$PYTHON -m torch.distributed.run $DISTRIBUTED_ARGS -m qtrain pretrain \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    $OPTIMIZE_ARGS \
    $TRAIN_ARGS \
    $MODEL_PARALLEL_ARGS \
    $PRECISION_ARGS \
    --distributed-backend "$([ "$QTRAIN_TINY" = 1 ] && echo gloo || echo nccl)" \
    $LOAD_ARGS \
    --save "$CKPT_SAVE_DIR" \
    "$@" \
    2>&1 | tee -a logs/pretrain_qwen3_1.7b_4k.log
exit "${PIPESTATUS[0]}"
