"""Global gradient norm and clipping across every parallel dimension.

Gradients are DTensors on different meshes (FSDP's dp mesh, dp x tp for tensor-parallel
weights), which torch's clip_grad_norm_ cannot stack together; pipeline stages each hold some
of the parameters. The norm is computed per (mesh, placements) group, made global with DTensor's
reductions, then summed over pipeline stages. The LM head that duplicates a tied embedding on
the last pipeline stage is counted once.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _grads(model: nn.Module) -> list[torch.Tensor]:
    state = getattr(model, "qtrain_parallel", None)
    skip = None
    pipe = state.pipeline if state is not None else None
    if pipe is not None and pipe.tied_group is not None and pipe.is_last and not pipe.is_first:
        skip = model.lm_head.weight
    return [p.grad for p in model.parameters() if p.grad is not None and p is not skip]


def grad_norm(model: nn.Module) -> float:
    """L2 norm of all gradients of the (possibly parallelized) model, identical on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for g in _grads(model):
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else "local"
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float32)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = total + norm.float().cpu() ** 2
    state = getattr(model, "qtrain_parallel", None)
    if state is not None and state.pipeline is not None:
        dev = state.pipeline.stages[0].device
        total = total.to(dev)
        dist.all_reduce(total, group=state.pipeline.pp_group)
    return math.sqrt(float(total))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Scale gradients so their global norm is at most max_norm (0 disables); returns the norm."""
    norm = grad_norm(model)
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
