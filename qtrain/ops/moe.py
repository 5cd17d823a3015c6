"""Mixture-of-experts compute: routing (softmax, top-k, optional renormalisation, as transformers'
Qwen3MoeTopKRouter), the permutation of token copies into expert order and back, and the grouped
matmul of every expert's projection in one call.

`grouped_mm(x, w, counts)`: x [N, in] holds the token copies sorted by expert, counts[e] of them
for expert e; w [E, out, in] stacks the experts' nn.Linear-shaped weights; the result is
x[rows of e] @ w[e].T for every e, [N, out]. Paths (qtrain/ops/dispatch.py, grouped_mm_impl):
  torch      CUDA: torch._grouped_mm, one kernel for all experts. It takes bf16 and 16-byte aligned
             strides (in and out multiples of 8 in bf16); other inputs take the reference.
  npu        Ascend: torch_npu.npu_grouped_matmul (split_item 2, group_type 0, cumulative group
             list). UNTESTED here (no Ascend machine): the call follows torch_npu's documented
             signature; verify on a device before trusting it.
  padded     an accelerator when the grouped kernels do not take the input (e.g. fp32 on CUDA):
             the copies padded to [E, most copies of any expert, in] and one batched matmul.
  reference  CPU: one matmul per expert over its slice (a loop over experts, on the CPU only).
The CPU can also run torch._grouped_mm (torch >= 2.9 has a CPU fallback); the tests compare it
with the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtrain.ops import dispatch


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch._grouped_mm's backward
    refuses gradients with broadcast (zero) strides, as `y.sum()` gives."""

    @staticmethod
    def forward(ctx, x):  # noqa: ARG004
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ARG004
        return grad.contiguous()


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per expert over its rows (reads counts on the host)."""
    pieces = torch.split(x, counts.tolist())
    return torch.cat([piece @ w[e].t() for e, piece in enumerate(pieces)]) if len(x) else x.new_zeros(0, w.shape[1])


def grouped_mm_padded(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One torch.bmm over experts padded to the largest count (reads that count on the host)."""
    num_experts = w.shape[0]
    expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts, output_size=x.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert]
    padded = x.new_zeros(num_experts, int(counts.max()) if x.shape[0] else 0, x.shape[1])
    padded = padded.index_put((expert, slot), x)
    return torch.bmm(padded, w.transpose(-2, -1))[expert, slot]


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm over the experts (offsets = cumulative counts, int32)."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets))


def grouped_mm_npu(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # pragma: no cover
    """torch_npu.npu_grouped_matmul (untested here; see the module docstring)."""
    group_list = torch.cumsum(counts, 0, dtype=torch.int64)
    out = dispatch.npu().npu_grouped_matmul([x], [w.transpose(-2, -1)], group_list=group_list,
                                             split_item=2, group_type=0)
    return out[0]


def _aligned_bf16(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype == w.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and w.shape[1] % 8 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[N, in] token copies sorted by expert, [E, out, in] weights, [E] counts -> [N, out]."""
    path = dispatch.grouped_mm_impl(x.device)
    if path == "torch" and _aligned_bf16(x, w):
        return grouped_mm_torch(x, w, counts)
    if path == "npu":
        return grouped_mm_npu(x, w, counts)
    if x.device.type != "cpu":
        return grouped_mm_padded(x, w, counts)
    return grouped_mm_reference(x, w, counts)


def route(router_logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' Qwen3MoeTopKRouter on [T, E] logits: softmax in float32, the top_k experts
    per token, their probabilities optionally renormalised to sum to 1, cast back to the logits'
    dtype. Returns (weights [T, k], experts [T, k] int64, probs [T, E] float32)."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts, probs


def permute(x: torch.Tensor, experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token copies in expert order. x [T, H], experts [T, k] -> (x_sorted [T*k, H], counts [E],
    order [T*k]: the flat (token, slot) index of each sorted copy, for `unpermute`)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: within an expert, tokens stay in order
    counts = torch.bincount(flat, minlength=num_experts)
    return x[order // experts.shape[1]], counts, order


def unpermute(y_sorted: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Weight each expert output by its routing weight and sum the k copies of each token back
    into [T, H] (in the order of the experts, as transformers adds them)."""
    k = weights.shape[1]
    y = y_sorted * weights.reshape(-1)[order].unsqueeze(-1)
    out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    return out.index_add_(0, order // k, y)
