"""Global gradient norm and clipping across every parallel dimension.

Data (and context) parallel alone: every gradient is an FSDP DTensor on one mesh, and torch's
clip_grad_norm_ computes the global norm without waiting on the device. With TP or PP the
gradients are DTensors on different meshes (FSDP's dp mesh, dp x tp for tensor-parallel
weights), which torch's clip_grad_norm_ cannot stack together, and pipeline stages each hold
some of the parameters: the norm is computed per (mesh, placements) group, made global with
DTensor's reductions, then summed over pipeline stages (this syncs with the host). The LM head
that duplicates a tied embedding on the last pipeline stage is counted once.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from qtrain.parallel.full_tensors import full_tensor


def _grads(model: nn.Module, state) -> list[torch.Tensor]:
    skip = None
    pipe = state.pipeline
    if pipe is not None and pipe.tied_group is not None and pipe.is_last and not pipe.is_first:
        skip = model.lm_head.weight
    return [p.grad for p in model.parameters() if p.grad is not None and p is not skip]


def grad_norm(model: nn.Module, state) -> float:
    """L2 norm of all gradients of the parallelized model (`state` from parallelize), identical on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for g in _grads(model, state):
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else "local"
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float32)
    for grads in groups.values():
        norm = full_tensor(torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True))
        total = total + norm.float().cpu() ** 2
    if state.pipeline is not None:
        total = total.to(state.pipeline.stages[0].device)
        dist.all_reduce(total, group=state.pipeline.pp_group)
    return math.sqrt(float(total))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, state) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm (0: only measure); returns the
    norm before clipping as a float32 tensor on the parameters' device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if state.dims.tp == 1 and state.dims.pp == 1 and getattr(state, "ep", 1) == 1:  # one mesh for every gradient
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)).float()
    norm = grad_norm(model, state)
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    device = params[0].to_local().device if isinstance(params[0], DTensor) else params[0].device
    return torch.tensor(norm, dtype=torch.float32, device=device)
