"""Parallelism for the plain Qwen3 model, applied from outside in one fixed order:

    pipeline split -> tensor (+ sequence) parallel -> context parallel -> recompute -> compile -> FSDP

`build_mesh(cfg, world_size)` validates the layout and makes the DeviceMesh (one device is a
mesh of one rank); `parallelize(model, mesh, cfg)` transforms a meta-device Qwen3ForCausalLM and
returns the module this rank trains (HF parameter names; materialise it afterwards with
parallel.weights.materialize) together with its `ParallelState`, which tells the training step
what it must do: run the pipeline schedule, shard the batch for context parallel, and over
which ranks the losses differ. The loss itself needs nothing from it: on every layout the model
computes it from its hidden states and its LM-head weight, a vocab-sharded DTensor under TP
(qtrain.ops.linear_cross_entropy), without logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from qtrain.errors import ConfigError
from qtrain.parallel.mesh import ParallelDims, build_mesh, mesh_dims, parallel_args, stage_layers, validate_layout

__all__ = ["ParallelState", "build_mesh", "parallelize", "validate_layout", "ParallelDims"]


@dataclass
class ParallelState:
    """How this rank's model is laid out, for the training step, the loop and gradient clipping."""

    mesh: Any
    dims: ParallelDims
    pipeline: Any = None  # qtrain.parallel.pipeline.Pipeline when PP > 1
    cp_group: Optional[dist.ProcessGroup] = None
    ep: int = 1  # expert parallelism (MoE experts sharded over EP groups of data-parallel ranks)

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()

    @property
    def loss_group(self) -> dist.ProcessGroup:
        """The ranks that see different tokens (data and context parallel): losses and token
        counts are summed or averaged over them; TP and PP ranks already agree."""
        return self.mesh["dp_cp"].get_group()

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a [B, S] batch this rank computes: its context-parallel slice with global
        `position_ids`, or the batch unchanged."""
        if self.cp_group is None:
            return batch
        from qtrain.parallel.context import shard_batch

        return shard_batch(batch, self.cp_group)


def _positions_hook(seq_scale: int, cp_group=None):
    """Default position_ids 0..S-1 of the full sequence. Under sequence parallel a stage that
    receives hidden states sees S/TP of them, so the count is scaled back; under context
    parallel (a pipeline stage gets no positions) they are the global positions of this rank's
    zigzag chunks."""

    def hook(module, args, kwargs):  # noqa: ARG001
        if len(args) > 1 or kwargs.get("position_ids") is not None:
            return None
        x = args[0] if args else kwargs["input_ids"]
        seq = x.shape[1] * (1 if not torch.is_floating_point(x) else seq_scale)
        if cp_group is not None:
            from qtrain.parallel.context import zigzag_positions

            cp = dist.get_world_size(cp_group)
            pos = zigzag_positions(seq * cp, cp, dist.get_rank(cp_group), x.device)
        else:
            pos = torch.arange(seq, device=x.device)
        kwargs["position_ids"] = pos.unsqueeze(0).expand(x.shape[0], -1)
        return args, kwargs

    return hook


def _layers(chunk: nn.Module) -> list[nn.Module]:
    return list(chunk.model.layers.values())


def parallelize(model: nn.Module, mesh, cfg: Any, *, device: Optional[torch.device] = None
                ) -> tuple[nn.Module, ParallelState]:
    """Apply the layout of `mesh` (from build_mesh) to a meta-device Qwen3ForCausalLM.

    cfg: a PretrainConfig (ParallelArgs alone work too: then fp32 compute, no compile and one
    micro-batch per step). With `--bf16`, FSDP2 computes in bf16 over fp32 master weights and
    reduces gradients in fp32; with `--compile`, each decoder layer is torch.compile'd; cfg.offload
    (qtrain.parallel.offload): optimizer state and chosen layers' activations in host memory.
    Returns (the module to materialise, optimise and checkpoint on this rank, its ParallelState).
    """
    from qtrain.parallel import expert
    from qtrain.parallel.fsdp import apply_fsdp, data_parallel_mesh
    from qtrain.parallel.recompute import apply_recompute
    from qtrain.parallel.tensor import apply_tensor_parallel

    p = parallel_args(cfg)
    training = getattr(cfg, "training", None)
    dims = mesh_dims(mesh)
    validate_layout(cfg, dims.world_size, model.config)
    bf16 = bool(getattr(training, "bf16", False))
    compile_layers = bool(getattr(training, "compile", False))
    stages = stage_layers(p, model.config.num_hidden_layers)
    state = ParallelState(mesh, dims, ep=expert.expert_parallel_size(cfg))
    expert.check_expert_parallel(cfg, dims, model.config)
    offload = getattr(cfg, "offload", None)  # --optimizer-cpu-offload, --cpu-offloading
    if offload is not None and offload.cpu_offloading and \
            offload.cpu_offloading_num_layers >= model.config.num_hidden_layers:
        raise ConfigError(f"--cpu-offloading-num-layers {offload.cpu_offloading_num_layers} must be below the "
                          f"{model.config.num_hidden_layers} decoder layers (the last layer's activations are used "
                          f"at once), as in Megatron")
    if offload is not None and offload.optimizer_offloaded and state.ep > 1:
        raise ConfigError("--optimizer-cpu-offload / --swap-optimizer with --expert-model-parallel-size > 1 is not "
                          "supported yet (the experts' FSDP units would keep their optimizer state on the device); "
                          "use one of them")

    if dims.pp > 1:
        from qtrain.parallel.pipeline import split_into_chunks, stage_view

        chunks = split_into_chunks(model, stages, mesh["pp"].get_local_rank())
    else:
        chunks = [model]
    cp_attention = None
    if dims.cp > 1:
        from qtrain.parallel.context import apply_context_parallel, context_parallel_attention
        from qtrain.parallel.mesh import ulysses_degree

        state.cp_group = mesh["cp"].get_group()
        cp_attention = context_parallel_attention(mesh, p.context_parallel_algo, ulysses_degree(p, dims.cp))
    emesh = expert.expert_mesh(mesh, state.ep) if state.ep > 1 else None
    experts = expert.apply_expert_parallel(chunks, emesh) if emesh is not None else []
    for chunk in chunks:
        if dims.tp > 1:
            apply_tensor_parallel(chunk, mesh["tp"], p.sequence_parallel)
        if cp_attention is not None:
            apply_context_parallel(chunk, cp_attention)
        apply_recompute(chunk, p.recompute_granularity, p.recompute_method, p.recompute_num_layers)
        if offload is not None and offload.cpu_offloading:
            from qtrain.parallel.offload import apply_activation_offload

            apply_activation_offload(chunk, offload.cpu_offloading_num_layers)
        if compile_layers:
            for layer in _layers(chunk):
                layer.compile()
        chunk.register_forward_pre_hook(_positions_hook(dims.tp if p.sequence_parallel else 1, state.cp_group),
                                        with_kwargs=True)
    view = stage_view(chunks) if dims.pp > 1 else model
    from qtrain.parallel.offload import offload_policy

    if experts:  # their own FSDP units first, over the ranks that hold the same experts
        expert.shard_experts(experts, emesh, bf16, dims.pp == 1)
    apply_fsdp(chunks, _layers(view), data_parallel_mesh(mesh), bf16, reshard_after_forward=dims.pp == 1,
               offload_policy=offload_policy(offload is not None and offload.optimizer_offloaded, mesh.device_type))

    if dims.pp > 1:
        state.pipeline = _build_pipeline(chunks, stages, mesh, cfg, dims, device)
    return view, state


def _build_pipeline(chunks, stages, mesh, cfg, dims: ParallelDims, device):
    from qtrain.parallel.batch import batch_plan
    from qtrain.parallel.pipeline import Pipeline, tied_embedding_group

    num_microbatches = batch_plan(cfg, dims.world_size).num_microbatches if hasattr(cfg, "training") else 1
    tied = getattr(chunks[0].config, "tie_word_embeddings", False)
    if device is None:
        acc = torch.accelerator.current_accelerator()
        device = torch.device("cpu") if acc is None or mesh.device_type == "cpu" else \
            torch.device(acc.type, torch.accelerator.current_device_index())
    return Pipeline(chunks, stages, mesh["pp"].get_group(), device, num_microbatches=num_microbatches,
                    tied_group=tied_embedding_group(mesh) if tied else None)
