"""The Qwen3-MoE experts block (transformers' Qwen3MoeSparseMoeBlock) and its load-balancing loss.

Parameter names are transformers 5's: `mlp.gate.weight` [E, H] (the router), and the experts
stacked, `mlp.experts.gate_up_proj` [E, 2*I, H] (each expert's gate rows, then its up rows) and
`mlp.experts.down_proj` [E, H, I]. Released checkpoints store one tensor per expert
(`mlp.experts.{e}.gate_proj.weight`, ...); qtrain.models.hf maps between the two.

`Qwen3MoeExperts` computes already-permuted token copies (torchtitan's GroupedExperts shape):
forward(x_sorted [N, H], counts [E]) -> [N, H]. Routing, permutation and the weighted sum back
live in the block (qtrain.ops.moe), so expert parallelism can wrap the experts from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.models.config import Qwen3Config
from qtrain.ops.moe import grouped_mm, permute, route, unpermute
from qtrain.ops.swiglu import swiglu


class Qwen3MoeRouter(nn.Module):
    """The gate: one logit per expert, a linear map without bias (`mlp.gate.weight` [E, H])."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Qwen3MoeExperts(nn.Module):
    """All experts' SwiGLU MLPs, weights stacked over experts, computed by grouped matmuls."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up = grouped_mm(x_sorted, self.gate_up_proj, counts).chunk(2, dim=-1)
        return grouped_mm(swiglu(gate, up), self.down_proj, counts)


@dataclass
class RouterStats:
    """What one sparse layer's routing of one forward leaves for the loss and the metrics."""

    prob_sum: torch.Tensor  # [E] float32, differentiable: the routing probabilities summed over tokens
    counts: torch.Tensor  # [E] int64: token copies sent to each expert
    num_tokens: int


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Route each token to its top-k experts and sum their outputs, weighted (transformers' block).

    After each forward, `stats` holds its RouterStats (for the load-balancing loss and the
    expert-load metrics); a recomputed forward overwrites it with equal values."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Qwen3MoeRouter(cfg)
        self.experts = Qwen3MoeExperts(cfg)
        self.stats: RouterStats | None = None
        self.aux_loss = None  # qtrain.models.moe_aux.LayerAuxLoss with Megatron's per-layer loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts, probs = route(self.gate(flat), self.top_k, self.norm_topk_prob)
        x_sorted, counts, order = permute(flat, experts, self.num_experts)
        y = unpermute(self.experts(x_sorted, counts), weights, order, flat.shape[0])
        self.stats = RouterStats(probs.sum(0), counts, flat.shape[0])
        if self.aux_loss is not None:
            y = self.aux_loss.attach(y, probs, counts, self.top_k)
        return y.reshape(shape)


def load_balancing_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6) over the layers' stats,
    without an attention mask: E * sum_e f_e * P_e, where over all layers and tokens together
    f_e = (token copies routed to e) / rows and P_e = (routing probability of e summed) / rows,
    rows = layers * tokens. So f sums to top_k, and the layers are pooled before the product.

    Megatron-LM (switch_load_balancing_loss_func, --moe-router-load-balancing-type aux_loss)
    differs: it computes E * sum_e f_e * P_e per layer with f_e normalised by tokens * top_k
    (f sums to 1), adds every layer's loss to the training loss (each times the coefficient),
    and logs their mean. See docs/moe.md."""
    rows = sum(s.num_tokens for s in stats)
    counts = torch.stack([s.counts for s in stats]).sum(0).float()
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)
    return num_experts * torch.sum((counts / rows) * (probs / rows))
