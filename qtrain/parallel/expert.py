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

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def _exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [E] (tokens this rank sends to each global expert) -> [EP, E/EP]: row s = the tokens
    rank s sends to each of this rank's experts."""
    import torch.distributed as dist

    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(dist.get_world_size(group), -1)


def _regroup_index(received: torch.Tensor) -> torch.Tensor:
    """Row order that turns tokens laid out [source rank][local expert] into [local expert][source rank]."""
    ep, local = received.shape
    starts = torch.cumsum(received.flatten(), 0) - received.flatten()  # where each (rank, expert) block begins
    blocks = [torch.arange(int(starts[s * local + e]), int(starts[s * local + e] + received[s, e]))
              for e in range(local) for s in range(ep)]
    return torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.long)


def dispatch_and_run(experts: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                     num_tokens_per_expert: torch.Tensor, group) -> torch.Tensor:
    """Send x (sorted by global expert) to the experts' ranks, run the local experts (module
    `experts` called with the local `params`), and return the outputs in x's order."""
    ep = torch.distributed.get_world_size(group)
    counts = num_tokens_per_expert.to(torch.int64)
    received = _exchange_counts(counts, group)
    send_splits = counts.view(ep, -1).sum(1).tolist()
    recv_splits = received.sum(1).tolist()
    tokens = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)
    order = _regroup_index(received).to(x.device)
    local_out = torch.func.functional_call(experts, params, (tokens[order], received.sum(0)))
    back = torch.empty_like(local_out).index_copy(0, order, local_out)  # [source rank][local expert] again
    return all_to_all_single_autograd(back, send_splits, recv_splits, group)


class ExpertParallel:
    """Shard an experts module over a 1-D EP mesh and route its tokens with all-to-all."""

    def __init__(self, ep_mesh) -> None:
        self.mesh = ep_mesh

    def apply(self, experts: nn.Module) -> nn.Module:
        ep = self.mesh.size()
        for name, param in list(experts.named_parameters(recurse=False)):
            if param.shape[0] % ep:
                raise ValueError(f"expert parallel size {ep} does not divide the {param.shape[0]} experts of {name}")
            experts.register_parameter(name, nn.Parameter(distribute_tensor(param.detach(), self.mesh, [Shard(0)]),
                                                          requires_grad=param.requires_grad))
        group, inner = self.mesh.get_group(), experts.forward

        def forward(x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
            local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in experts.named_parameters(recurse=False)}
            experts.forward = inner  # functional_call runs the module's own forward
            try:
                return dispatch_and_run(experts, local, x, num_tokens_per_expert, group)
            finally:
                experts.forward = forward

        experts.forward = forward
        return experts
