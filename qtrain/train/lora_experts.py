"""LoRA on Qwen3-MoE experts: a low-rank pair per expert on the stacked expert weights.

A stacked weight W [E, out, in] (`experts.gate_up_proj` or `experts.down_proj`) gets
A [E, r, in] and B [E, out, r] (`experts.gate_up_proj_lora.lora_A`, `.lora_B`); expert e computes
W[e] x + B[e] A[e] x * alpha / r, the low-rank path through the same grouped matmuls as the base
(no [E, out, in] delta is formed). peft's initialisation: A Kaiming-uniform (fan-in = in), B zero.

Adapter files use the per-expert names of released checkpoints: expert e of a stacked pair is
`<experts>.{e}.gate_proj` (A[e], B[e, :I]), `.up_proj` (A[e], B[e, I:]) and `.down_proj`, each an
ordinary peft LoRA pair of rank r. That is exact (gate and up share A) and it is the format peft
and vLLM read for Qwen3-MoE: peft >= 0.18 on transformers 5 fuses the gate and up pairs into one
rank-2r pair on `gate_up_proj` when it loads them (tests/train/test_moe_lora.py checks the logits).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qtrain.models.moe import Qwen3MoeExperts
from qtrain.ops.moe import grouped_mm
from qtrain.ops.swiglu import swiglu

PROJECTIONS = ("gate_up_proj", "down_proj")


class ExpertLoRA(nn.Module):
    """The per-expert low-rank pair of one stacked weight [E, out, in]."""

    def __init__(self, weight: torch.Tensor, r: int):
        super().__init__()
        e, out, inp = weight.shape
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(e, r, inp, **kw))
        self.lora_B = nn.Parameter(torch.zeros(e, out, r, **kw))
        if weight.device.type != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A.view(e * r, inp), a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """B @ A per expert, float32 [E, out, in] (merging only)."""
        return torch.bmm(self.lora_B.float(), self.lora_A.float())


class LoRAExperts(Qwen3MoeExperts):
    """Qwen3MoeExperts (same frozen parameters, same names) plus ExpertLoRA pairs on both projections."""

    def __init__(self, base: Qwen3MoeExperts, r: int, alpha: float):
        nn.Module.__init__(self)
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        self.gate_up_proj_lora = ExpertLoRA(self.gate_up_proj, r)
        self.down_proj_lora = ExpertLoRA(self.down_proj, r)
        self.scaling = alpha / r
        self.disabled = False  # see qtrain.train.lora.adapters_disabled

    def _project(self, x: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
        y = grouped_mm(x, getattr(self, name), counts)
        if self.disabled:
            return y
        lora: ExpertLoRA = getattr(self, f"{name}_lora")
        return y + grouped_mm(grouped_mm(x, lora.lora_A, counts), lora.lora_B, counts) * self.scaling

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up = self._project(x_sorted, "gate_up_proj", counts).chunk(2, dim=-1)
        return self._project(swiglu(gate, up), "down_proj", counts)


def per_expert_pairs(experts_name: str, proj: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """One stacked pair (A [E, r, in], B [E, out, r]) as per-expert peft tensors (module doc)."""
    out = {}
    for e in range(a.shape[0]):
        if proj == "down_proj":
            parts = {"down_proj": b[e]}
        else:
            half = b.shape[1] // 2
            parts = {"gate_proj": b[e, :half], "up_proj": b[e, half:]}
        for name, b_e in parts.items():
            out[f"{experts_name}.{e}.{name}.lora_A.weight"] = a[e].clone()  # gate and up: one A, two files
            out[f"{experts_name}.{e}.{name}.lora_B.weight"] = b_e.contiguous()
    return out
