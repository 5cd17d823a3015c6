"""Causal grouped-query attention through torch's scaled_dot_product_attention.

SDPA picks the fastest backend available (flash / cuDNN / memory-efficient on GPU, math on CPU).
Packed documents (`docs`) go to qtrain.ops.document_attention, which never builds an [S, S] mask.
"""

import contextlib

import torch
import torch.nn.functional as F

from qtrain.ops.document_attention import Documents, document_attention

# Attention implementations installed by qtrain.parallel (context parallel), innermost last.
_OVERRIDES: list = []


@contextlib.contextmanager
def override_attention(fn):
    """Route `attention()` through fn(q, k, v, mask, docs) inside the block (used by context parallel)."""
    _OVERRIDES.append(fn)
    try:
        yield
    finally:
        _OVERRIDES.remove(fn)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              docs: Documents | None = None) -> torch.Tensor:
    """q: [B, Hq, S, D]; k, v: [B, Hkv, S, D]. `mask`: optional bool [B, 1, S, S], True = may attend
    (left-padded generation; it must already be causal). `docs`: the batch's documents (packed
    samples): causal attention within each. Returns [B, Hq, S, D]."""
    if _OVERRIDES:
        return _OVERRIDES[-1](q, k, v, mask, docs)
    return base_attention(q, k, v, mask, docs)


def base_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   docs: Documents | None = None) -> torch.Tensor:
    """`attention` on this rank's tensors alone, whatever override is installed (what context
    parallel runs once it has whole sequences)."""
    if docs is not None:
        if mask is not None:
            raise ValueError("attention takes a mask or documents, not both")
        return document_attention(q, k, v, docs)
    if mask is None:
        # SDPA reads the shared K/V heads itself (no repeated copy), with every backend that
        # supports it; transformers takes the same path, so the two agree to the last bit.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # masked GQA falls back to the math kernel on some backends: repeat K/V instead
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
