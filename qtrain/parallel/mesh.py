"""The parallel layout: degrees, their validation, and the DeviceMesh over them.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp (tp innermost so its
ranks are neighbours, on one node). Data parallel is what is left: dp = world / (pp * cp * tp).
`--use-distributed-optimizer` shards parameters, gradients and optimizer state over dp with
FSDP2 (dp_shard = dp); without it each dp rank keeps a full replica (dp_replicate = dp), as
Megatron's DDP does. Every check here runs before any weight exists, and raises ConfigError
naming the option and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from qtrain.parallel.stages import parse_num_layer_list, split_layers
from qtrain.errors import ConfigError

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each mesh dimension."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, n) for n in DIM_NAMES)

    def describe(self) -> str:
        return " x ".join(f"{n}{getattr(self, n)}" for n in DIM_NAMES if getattr(self, n) > 1) or "single device"


def parallel_args(cfg: Any):
    """The ParallelArgs of a PretrainConfig (or the ParallelArgs themselves)."""
    return getattr(cfg, "parallel", cfg)


def parallel_dims(cfg: Any, world_size: int) -> ParallelDims:
    """Degrees of each dimension from the options and the world size (checks divisibility)."""
    p = parallel_args(cfg)
    sizes = {"--tensor-model-parallel-size": p.tensor_model_parallel_size,
             "--pipeline-model-parallel-size": p.pipeline_model_parallel_size,
             "--context-parallel-size": p.context_parallel_size}
    for name, v in sizes.items():
        if v is None or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v}")
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by TP x PP x CP = {p.tensor_model_parallel_size} x "
            f"{p.pipeline_model_parallel_size} x {p.context_parallel_size} = {model_parallel}; change "
            f"--tensor-model-parallel-size / --pipeline-model-parallel-size / --context-parallel-size "
            f"or the number of processes (torchrun --nproc-per-node x --nnodes)")
    dp = world_size // model_parallel
    shard = p.use_distributed_optimizer
    return ParallelDims(pp=p.pipeline_model_parallel_size, dp_replicate=1 if shard else dp,
                        dp_shard=dp if shard else 1, cp=p.context_parallel_size, tp=p.tensor_model_parallel_size)


def stage_layers(cfg: Any, num_layers: int) -> list[list[list[int]]]:
    """Global layer indices per pipeline stage and virtual chunk (validated; see parallel.stages)."""
    p = parallel_args(cfg)
    pp, vpp = p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage
    if vpp is not None and pp == 1:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    stages = split_layers(num_layers, pp, parse_num_layer_list(p.num_layer_list), vpp)
    if vpp is not None and len(stages[0]) < 2:
        raise ConfigError(
            f"--num-layers-per-virtual-pipeline-stage {vpp} gives one chunk per stage ({num_layers} layers, "
            f"PP {pp}); use fewer layers per virtual stage or drop the option")
    return stages


def validate_layout(cfg: Any, world_size: int, model_cfg: Optional[Any] = None,
                    seq_length: Optional[int] = None) -> ParallelDims:
    """Every layout rule; returns the degrees. `cfg` is a PretrainConfig or ParallelArgs.

    model_cfg (a Qwen3Config) enables the head / vocabulary / layer checks; seq_length (default
    cfg.data.seq_length when present) enables the sequence checks.
    """
    p = parallel_args(cfg)
    dims = parallel_dims(cfg, world_size)
    if seq_length is None and hasattr(cfg, "data"):
        seq_length = cfg.data.seq_length
    if p.sequence_parallel and dims.tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards the "
                          "sequence inside tensor-parallel regions); drop it or raise TP")
    _validate_cp_algo(p, dims)
    if seq_length is not None:
        if dims.cp > 1 and seq_length % (2 * dims.cp):
            raise ConfigError(
                f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size = {2 * dims.cp} "
                f"(each CP rank holds two load-balanced chunks)")
        if p.sequence_parallel and (seq_length // dims.cp) % dims.tp:
            raise ConfigError(
                f"--sequence-parallel: the per-rank sequence {seq_length // dims.cp} is not divisible by "
                f"--tensor-model-parallel-size {dims.tp}; change --seq-length")
    _validate_recompute(p)
    _validate_microbatches(cfg, dims)
    if model_cfg is not None:
        _validate_model(p, dims, model_cfg)
    return dims


def _validate_cp_algo(p: Any, dims: ParallelDims) -> None:
    algo = getattr(p, "context_parallel_algo", "megatron_cp_algo")
    u = getattr(p, "ulysses_degree_in_cp", None)
    if algo == "hybrid_cp_algo":
        if u is None or u < 1 or dims.cp % u:
            raise ConfigError(f"--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp dividing "
                              f"--context-parallel-size {dims.cp} (got {u})")
    elif u is not None:
        raise ConfigError(f"--ulysses-degree-in-cp {u} applies to --context-parallel-algo hybrid_cp_algo only "
                          f"(got {algo})")


def ulysses_degree(p: Any, cp: int) -> int:
    """CP ranks per Ulysses all-to-all group: CP for ulysses_cp_algo, 1 for the ring."""
    algo = getattr(p, "context_parallel_algo", "megatron_cp_algo")
    return {"megatron_cp_algo": 1, "ulysses_cp_algo": cp}.get(algo) or p.ulysses_degree_in_cp


def _validate_model(p: Any, dims: ParallelDims, m: Any) -> None:
    tp = dims.tp
    if m.num_attention_heads % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {m.num_attention_heads} "
                          f"attention heads (--num-attention-heads); choose a TP that divides it")
    if m.num_key_value_heads % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {m.num_key_value_heads} "
                          f"query groups (--num-query-groups); choose TP <= {m.num_key_value_heads} dividing it")
    if dims.cp > 1 and ulysses_degree(p, dims.cp) > 1:
        from qtrain.parallel.ulysses import check_heads

        check_heads(m.num_attention_heads // tp, m.num_key_value_heads // tp, ulysses_degree(p, dims.cp))
    if m.vocab_size % tp:
        raise ConfigError(
            f"vocab size {m.vocab_size} (--padded-vocab-size) is not divisible by --tensor-model-parallel-size "
            f"{tp}, which the vocab-parallel embedding and loss need; pad the vocabulary to a multiple of "
            f"{tp} (--make-vocab-size-divisible-by) or choose a TP that divides it")
    stages = stage_layers(p, m.num_hidden_layers)
    if p.recompute_method == "block" and p.recompute_num_layers is not None:
        most = max(sum(len(c) for c in chunks) for chunks in stages)
        if p.recompute_num_layers > most:
            raise ConfigError(f"--recompute-num-layers {p.recompute_num_layers} exceeds the {most} layers of a "
                              f"pipeline stage (--recompute-method block)")


def _validate_microbatches(cfg: Any, dims: ParallelDims) -> None:
    """The pipeline schedules need at least PP micro-batches per step (interleaved: a multiple of PP)."""
    t = getattr(cfg, "training", None)
    if dims.pp == 1 or t is None:
        return
    from qtrain.parallel.batch import batch_plan

    plan = batch_plan(cfg, dims.world_size)
    gbs, n = plan.global_batch_size, plan.num_microbatches
    if n < dims.pp:
        raise ConfigError(
            f"--pipeline-model-parallel-size {dims.pp} needs at least {dims.pp} micro-batches per step, got {n} "
            f"(--global-batch-size {gbs} / (--micro-batch-size {t.micro_batch_size} x data-parallel {dims.dp})); "
            f"raise --global-batch-size to {t.micro_batch_size * dims.dp * dims.pp} or more")
    if parallel_args(cfg).num_layers_per_virtual_pipeline_stage is not None and n % dims.pp:
        raise ConfigError(
            f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs micro-batches per step "
            f"({n}) to be a multiple of --pipeline-model-parallel-size {dims.pp}; change --global-batch-size")


def _validate_recompute(p: Any) -> None:
    g, method, n = p.recompute_granularity, p.recompute_method, p.recompute_num_layers
    if g is None and (method is not None or n is not None):
        raise ConfigError("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    if g == "full" and method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
    if g == "full" and (n is None or n < 1):
        raise ConfigError(f"--recompute-granularity full needs --recompute-num-layers >= 1, got {n}")


def build_mesh(cfg: Any, world_size: int, device_type: Optional[str] = None, model_cfg: Optional[Any] = None):
    """Validate the layout and create the DeviceMesh (needs the process group when world_size > 1).

    Flattened views, used by qtrain.parallel: "dp" (dp_replicate, dp_shard) for data loading,
    "dp_shard_cp" (dp_shard, cp) and "dp_cp" (dp_replicate, dp_shard, cp) for gradient reduction,
    since CP ranks hold the same weights and see different tokens.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from qtrain import device as qdevice

    dims = validate_layout(cfg, world_size, model_cfg)
    mesh = init_device_mesh(device_type or qdevice.device_type(), dims.shape(), mesh_dim_names=DIM_NAMES)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh


def mesh_dims(mesh) -> ParallelDims:
    """The degrees of a mesh made by build_mesh."""
    return ParallelDims(*(mesh[n].size() for n in DIM_NAMES))
