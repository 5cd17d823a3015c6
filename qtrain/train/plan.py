"""Batch arithmetic, pre-start checks and the `--dry-run` plan (model size, layout, batch math,
memory from qtrain.parallel.plan.estimate_memory)."""

from __future__ import annotations

from dataclasses import dataclass

from qtrain.errors import ConfigError
from qtrain.train.metrics import flops_per_token


@dataclass
class BatchPlan:
    """How a global batch is made: GBS = MBS x DP x accumulation steps."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    num_microbatches: int
    seq_length: int

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


def make_batch_plan(cfg, world_size: int) -> BatchPlan:
    """Derive data-parallel size and gradient accumulation; explain what to change when they do not fit."""
    p, t = cfg.parallel, cfg.training
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP x CP = {model_parallel}; "
                          f"launch a multiple of {model_parallel} ranks or change the parallel sizes")
    dp = world_size // model_parallel
    mbs = t.micro_batch_size
    gbs = t.global_batch_size if t.global_batch_size is not None else mbs * dp
    if gbs % (mbs * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp} "
            f"= {mbs * dp}; use a multiple of {mbs * dp} (e.g. {max(1, round(gbs / (mbs * dp))) * mbs * dp})")
    return BatchPlan(mbs, gbs, dp, gbs // (mbs * dp), cfg.data.seq_length)


def check_model_fits(cfg, model_cfg) -> None:
    """Sequence length against the model's positions."""
    if cfg.data.seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {cfg.data.seq_length} exceeds the model's max_position_embeddings "
            f"{model_cfg.max_position_embeddings}; lower --seq-length or raise --max-position-embeddings")


def describe_plan(cfg, model_cfg, batch: BatchPlan, world_size: int) -> str:
    """The text `--dry-run` prints."""
    p = cfg.parallel
    n = model_cfg.num_params
    from qtrain.models.rope_scaling import describe as rope_describe
    from qtrain.parallel.plan import estimate_memory

    mem = estimate_memory(model_cfg, cfg, world_size)
    iters = cfg.training.train_iters or 0
    lines = [
        "qtrain pretrain plan (dry run: nothing is trained)",
        f"  model        Qwen3 {model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}, "
        f"ffn {model_cfg.intermediate_size}, heads {model_cfg.num_attention_heads}/{model_cfg.num_key_value_heads} kv, "
        f"head dim {model_cfg.head_dim}, vocab {model_cfg.vocab_size}, tied {model_cfg.tie_word_embeddings}",
        f"  positions    {rope_describe(model_cfg.rope_theta, model_cfg.rope_scaling)}; "
        f"max_position_embeddings {model_cfg.max_position_embeddings}",
        f"  parameters   {n:,} ({n / 1e9:.3f} B)",
        f"  layout       world {world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
        f" x CP {p.context_parallel_size} x DP {batch.data_parallel_size}",
        f"  batch        GBS {batch.global_batch_size} = MBS {batch.micro_batch_size} x DP {batch.data_parallel_size}"
        f" x {batch.num_microbatches} accumulation steps; seq {batch.seq_length}; "
        f"{batch.tokens_per_iteration:,} tokens/iteration",
        f"  run          {iters} iterations = {iters * batch.global_batch_size:,} samples = "
        f"{iters * batch.tokens_per_iteration:,} tokens",
        f"  compute      {flops_per_token(model_cfg, batch.seq_length) / 1e9:.2f} GFLOP/token "
        f"(6N + 12 L H Q T)",
        f"  precision    {'bf16 compute, fp32 master weights and gradient reduction' if cfg.training.bf16 else 'fp32'}",
        "  memory/device (GiB, estimate): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()),
    ]
    return "\n".join(lines)
