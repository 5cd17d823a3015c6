"""LM head + cross-entropy without materialising the [tokens, vocab] logits.

For Qwen3's 151,936-word vocabulary the float32 logits of one 4096-token sequence take 2.5 GB, and
their gradient as much again. Here tokens are processed in chunks: each chunk's logits live only
while its loss and its gradients (w.r.t. the hidden states and the head weight) are computed, in the
forward pass, since the loss is a scalar; backward only scales the stored gradients. Peak extra
memory is one chunk of logits (and its gradient, computed in place). On CUDA, Liger-Kernel's
Triton version (the same chunking, with the softmax gradient written over the logits by one
kernel) is used when installed; see dispatch.py.
"""

from __future__ import annotations

import torch

from qtrain.ops import dispatch
from qtrain.ops.cross_entropy import IGNORE_INDEX

# Tokens per chunk: 4096 on CPU (few chunks, tests compare against it); on an accelerator a
# [1024, 151936] float32 chunk of logits takes 0.6 GB instead of 2.5 GB.
_CHUNK = {"cpu": 4096}
_ACCELERATOR_CHUNK = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int):
        n = hidden.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            logits = (h @ weight.t()).float()
            valid = y != ignore_index
            target = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            loss_sum += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss_sum)/d(logits) = softmax - one_hot, zero on ignored rows; written over the
            # logits (no second chunk-sized buffer).
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, target[:, None], -torch.ones_like(picked)[:, None])
            grad_logits *= valid[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * grad_out.to(grad_weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def _liger_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # Positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction, softcap, return_z_loss, accum_dtype); grads accumulate in fp32.
    out = dispatch.liger().LigerFusedLinearCrossEntropyFunction.apply(
        h, weight, y, None, None, ignore_index, 0.0, 0.0, "sum", None, False, torch.float32)
    return out[0].float()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) in float32, chunked over tokens.

    hidden [..., H], weight [V, H], labels [...] aligned with hidden. reduction "mean" (over
    non-ignored tokens) or "sum". chunk_size: tokens per chunk of the reference path (default
    4096 on CPU, 1024 on accelerators).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if (dispatch.impl("linear_cross_entropy", h.device) == "liger" and h.dtype == weight.dtype
            and dispatch.plain(h, weight)):
        loss_sum = _liger_loss_sum(h, weight, y, ignore_index)
    else:
        chunk = chunk_size or _CHUNK.get(h.device.type, _ACCELERATOR_CHUNK)
        loss_sum = _ChunkedLinearCrossEntropy.apply(h, weight, y, ignore_index, chunk)
    if reduction == "sum":
        return loss_sum
    return loss_sum / (y != ignore_index).sum().clamp(min=1)
