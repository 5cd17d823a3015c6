"""Expert parallelism (EP), applied from outside to an experts module, like torchtitan's ExpertParallel.

The experts module is any module whose parameters stack the experts on dim 0 ([E, ...]) and whose
`forward(x, num_tokens_per_expert)` takes the tokens sorted by expert with the count of each
(qtrain's MoE experts; tests use a plain one). `ExpertParallel(ep_mesh).apply(experts)`:

- shards every parameter on dim 0 over the 1-D `ep_mesh` (DTensor Shard(0)): EP rank r holds
  experts [r E/EP, (r+1) E/EP), and state dicts stay global (DCP reshards across EP sizes);
- wraps `forward`: the counts are exchanged first (all_to_all_single of the [E] counts), then each
  rank's tokens go to the ranks of their experts (all_to_all_single with those split sizes,
  differentiable), are regrouped by local expert (they arrive ordered by source rank), run through
  the local experts (the module called with its local shards), and travel back the same way.

Every rank gets back its own tokens in the order it sent them, so what surrounds the experts
(router, sorting, combining) runs unchanged. Gradients reach the expert shards through the
all-to-alls: each shard's gradient sums over the tokens of every rank in its EP group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.utils.stateless import _reparametrize_module


def _exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [E] (tokens this rank sends to each global expert) -> [EP, E/EP]: row s = the tokens
    rank s sends to each of this rank's experts."""
    import torch.distributed as dist

    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(dist.get_world_size(group), -1)


def _regroup_index(received: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns tokens laid out [source rank][local expert] into [local expert][source rank]
    (vectorised on the counts' device: no per-block host round trip)."""
    starts = (torch.cumsum(received.flatten(), 0) - received.flatten()).view_as(received)
    lengths, firsts = received.t().flatten(), starts.t().flatten()  # blocks in [local expert][source rank] order
    block_starts = torch.cumsum(lengths, 0) - lengths
    return (torch.arange(total, device=received.device)
            + torch.repeat_interleave(firsts - block_starts, lengths, output_size=total))


def dispatch_and_run(run_local, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, group) -> torch.Tensor:
    """Send x (sorted by global expert) to the experts' ranks, run `run_local(tokens, counts)` on
    the tokens of this rank's experts, and return the outputs in x's order."""
    ep = torch.distributed.get_world_size(group)
    counts = num_tokens_per_expert.to(torch.int64)
    received = _exchange_counts(counts, group)
    send_splits = counts.view(ep, -1).sum(1).tolist()
    recv_splits = received.sum(1).tolist()
    tokens = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)
    order = _regroup_index(received, sum(recv_splits)).to(x.device)
    local_out = run_local(tokens[order], received.sum(0))
    back = torch.empty_like(local_out).index_copy(0, order, local_out)  # [source rank][local expert] again
    return all_to_all_single_autograd(back, send_splits, recv_splits, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertParallel:
    """Shard an experts module over a 1-D EP mesh and route its tokens with all-to-all.

    `grad_scale` multiplies the experts' weight gradients (shard_experts: 1 / EP, so that FSDP's
    mean over the expert-data-parallel ranks gives the mean over all data-parallel ranks)."""

    def __init__(self, ep_mesh, grad_scale: float = 1.0) -> None:
        self.mesh, self.grad_scale = ep_mesh, grad_scale

    def apply(self, experts: nn.Module) -> nn.Module:
        ep = self.mesh.size()
        for name, param in list(experts.named_parameters(recurse=False)):
            if param.shape[0] % ep:
                raise ValueError(f"expert parallel size {ep} does not divide the {param.shape[0]} experts of {name}")
            # src_data_rank=None: no scatter, each rank slices its part (also on the meta device)
            shard = distribute_tensor(param.detach(), self.mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        group, inner = self.mesh.get_group(), experts.forward

        def run_local(tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            # The module's own forward on its local shards. Not module(...): that would run the hooks
            # around the module (FSDP's gather / reshard) a second time.
            local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in experts.named_parameters(recurse=False)}
            if self.grad_scale != 1.0:
                local = {n: _ScaleGrad.apply(t, self.grad_scale) for n, t in local.items()}
            with _reparametrize_module(experts, local):
                return inner(tokens, counts)

        def forward(x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
            return dispatch_and_run(run_local, x, num_tokens_per_expert, group)

        experts.forward = forward
        return experts


# ----------------------------------------------------------------------------- in the training layout

def expert_parallel_size(cfg: Any) -> int:
    moe = getattr(cfg, "moe", None)
    return getattr(moe, "expert_model_parallel_size", 1) or 1


def check_expert_parallel(cfg: Any, dims, model_cfg) -> None:
    """The combinations training supports, each other one refused by name: EP out of the FSDP
    data-parallel ranks (--use-distributed-optimizer), with PP; not with TP, CP or LoRA yet."""
    from qtrain.errors import ConfigError

    ep = expert_parallel_size(cfg)
    if ep == 1:
        return
    flag = f"--expert-model-parallel-size {ep}"
    if not getattr(model_cfg, "num_experts", 0):
        raise ConfigError(f"{flag}: the model is dense (no experts)")
    if model_cfg.num_experts % ep:
        raise ConfigError(f"{flag} does not divide the model's {model_cfg.num_experts} experts")
    for bad, why in ((dims.tp > 1, "--tensor-model-parallel-size > 1"), (dims.cp > 1, "--context-parallel-size > 1"),
                     (dims.dp_replicate > 1, "data parallelism without --use-distributed-optimizer")):
        if bad:
            raise ConfigError(f"{flag} with {why} is not supported yet; expert parallelism runs over FSDP data-"
                              f"parallel ranks (--use-distributed-optimizer), with or without pipeline parallelism")
    if dims.dp_shard % ep:
        raise ConfigError(f"{flag} must divide the {dims.dp_shard} data-parallel ranks (EP groups are made of them)")


def expert_mesh(mesh, ep: int):
    """(pp, efsdp, ep) over the same ranks as `mesh` (build_mesh's, with TP = CP = 1 and FSDP):
    each EP group is `ep` neighbouring data-parallel ranks; efsdp shards each expert over the
    data-parallel ranks that hold the same experts."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = mesh.mesh.reshape(mesh["pp"].size(), -1, ep)
    emesh = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("pp", "efsdp", "ep"))
    emesh["efsdp", "ep"]._flatten("expert_dp")  # lets DTensor reduce over both in one collective (the grad norm)
    return emesh


def sparse_experts(chunk: nn.Module) -> list[nn.Module]:
    """The experts modules of a model (chunk)'s MoE layers."""
    return [layer.mlp.experts for layer in chunk.model.layers.values() if hasattr(layer.mlp, "experts")]


def apply_expert_parallel(chunks: list[nn.Module], emesh) -> list[nn.Module]:
    """ExpertParallel on every MoE layer of `chunks`; returns the experts modules (for shard_experts).

    Each rank's expert gradient sums the tokens of its whole EP group (the all-to-all's backward),
    while FSDP averages over the efsdp ranks only (dp / EP of them): the gradients are scaled by
    1 / EP, so the experts, like the dense part, get the mean over all data-parallel ranks."""
    experts = [e for chunk in chunks for e in sparse_experts(chunk)]
    ep = emesh["ep"].size()
    for module in experts:
        ExpertParallel(emesh["ep"], grad_scale=1.0 / ep).apply(module)
    return experts


def shard_experts(experts: list[nn.Module], emesh, bf16: bool, reshard_after_forward: bool) -> None:
    """FSDP2 over the expert-data-parallel ranks for each experts module (before the layers' own
    FSDP units)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for module in experts:
        fully_shard(module, mesh=emesh["efsdp"], mp_policy=mp, reshard_after_forward=reshard_after_forward)
