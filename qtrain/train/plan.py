"""Pre-start checks and the `--dry-run` plan (model size, layout, batch math from
qtrain.parallel.batch, memory from qtrain.parallel.plan.estimate_memory)."""

from __future__ import annotations

from qtrain.errors import ConfigError
from qtrain.parallel.batch import BatchPlan
from qtrain.train.metrics import flops_per_token


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
        f"head dim {model_cfg.head_dim}, vocab {model_cfg.vocab_size}, tied {model_cfg.tie_word_embeddings}"
        + (f"; {model_cfg.num_experts} experts of width {model_cfg.moe_intermediate_size}, top-"
           f"{model_cfg.num_experts_per_tok}, in {len(model_cfg.sparse_layers)} of {model_cfg.num_hidden_layers} "
           f"layers" if getattr(model_cfg, "is_moe", False) else ""),
        f"  positions    {rope_describe(model_cfg.rope_theta, model_cfg.rope_scaling)}; "
        f"max_position_embeddings {model_cfg.max_position_embeddings}",
        f"  parameters   {n:,} ({n / 1e9:.3f} B)" + (
            f"; {model_cfg.num_active_params:,} active per token" if getattr(model_cfg, "is_moe", False) else ""),
        f"  layout       world {world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
        f" x CP {p.context_parallel_size} x DP {batch.data_parallel_size}" + _expert_layout(cfg, model_cfg),
        *_context_lines(cfg),
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


def _context_lines(cfg) -> list[str]:
    """The context-parallel algorithm and Megatron's document flags, when given."""
    from qtrain.train.documents import document_flags

    p, out = cfg.parallel, []
    if p.context_parallel_size > 1:
        u = f", Ulysses degree {p.ulysses_degree_in_cp}" if p.context_parallel_algo == "hybrid_cp_algo" else ""
        out.append(f"  context      CP {p.context_parallel_size} {p.context_parallel_algo}{u}, zigzag load balance")
    if document_flags(cfg):
        out.append(f"  documents    split at EOD inside samples: {' '.join(document_flags(cfg))}")
    return out


def _expert_layout(cfg, model_cfg) -> str:
    """How experts are spread (MoE): EP groups of data-parallel ranks, or FSDP / replication over DP."""
    if not getattr(model_cfg, "is_moe", False):
        return ""
    ep = cfg.moe.expert_model_parallel_size
    if ep == 1:
        return "; experts FSDP-sharded over DP" if cfg.parallel.use_distributed_optimizer else "; experts replicated"
    return f"; EP {ep}: {model_cfg.num_experts // ep} experts per rank, tokens exchanged by all-to-all"
