"""Causal attention inside the documents of packed sequences, without an [S, S] mask.

Boundaries travel as `cu_seqlens`, flash-attention's convention: the cumulative lengths of the
documents of the whole batch read as one stream of B*S tokens (every sample boundary is also a
document boundary). A token attends to the tokens before it in its own document only.

Per device:
  CUDA, bf16/fp16   torch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`)
  Ascend NPU        `torch_npu.npu_fusion_attention`, layout "TND" with `actual_seq_qlen/kvlen`
  otherwise         the reference: one causal SDPA call per document, so no more than one
                    document's [L, L] block ever exists (CPU, CUDA fp32, and the tests' yardstick)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Documents:
    """The documents of a batch of B samples of S tokens each: `bounds` [0, ..., B*S] are the
    cumulative lengths (host ints, no empty document); `cu_seqlens` the same on the device (int32)."""

    bounds: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def from_sample_bounds(cls, sample_cu_seqlens: torch.Tensor, device: torch.device | None = None) -> "Documents":
        """From the batch's per-sample `cu_seqlens` [B, S + 1] (each row 0, ..., S, padded at the
        end by repeating S; the data sets' layout) to one stream of B*S tokens."""
        rows = sample_cu_seqlens.to("cpu", torch.int64)
        seq = int(rows[0, -1])
        flat = (rows + torch.arange(rows.shape[0])[:, None] * seq).flatten()
        bounds = torch.unique_consecutive(flat)  # drops the padding repeats and the shared ends
        lengths = bounds[1:] - bounds[:-1]
        return cls(tuple(bounds.tolist()), bounds.to(device=device, dtype=torch.int32),
                   int(lengths.max()) if len(lengths) else 0)


def sample_cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """Bool [S] (True where a document starts; position 0 always does) -> int32 [S + 1] cumulative
    lengths 0, ..., S, padded at the end with S (the fixed-size layout a DataLoader can stack)."""
    seq = starts.shape[0]
    begins = torch.nonzero(starts).flatten()
    if len(begins) == 0 or int(begins[0]) != 0:
        begins = torch.cat([torch.zeros(1, dtype=begins.dtype), begins])
    out = torch.full((seq + 1,), seq, dtype=torch.int32)
    out[: len(begins)] = begins.to(torch.int32)
    return out


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """q: [B, Hq, S, D]; k, v: [B, Hkv, S, D]; Hq a multiple of Hkv. Returns [B, Hq, S, D]."""
    b, hq, s, d = q.shape
    if docs.bounds[-1] != b * s:
        raise ValueError(f"document bounds cover {docs.bounds[-1]} tokens, the batch has {b} x {s}")
    fused = q.device.type == "npu" or (q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16))
    if not fused:
        return document_attention_reference(q, k, v, docs.bounds)
    # [B, H, S, D] -> [B*S, H, D]: the token-major ("TND") layout of variable-length kernels
    tq, tk, tv = (x.transpose(1, 2).reshape(b * s, x.shape[1], d) for x in (q, k, v))
    out = _npu_fusion(tq, tk, tv, docs) if q.device.type == "npu" else _varlen_flash(tq, tk, tv, docs)
    return out.view(b, s, hq, d).transpose(1, 2)


def document_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 bounds: tuple[int, ...]) -> torch.Tensor:
    """q: [B, Hq, S, D], k, v: [B, Hkv, S, D] -> [B, Hq, S, D], one causal SDPA per document on
    views of the inputs (`split`: one autograd node, whose backward concatenates the gradients)."""
    s = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for i, (qb, kb, vb) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):
        cuts = [x - i * s for x in bounds if i * s <= x <= (i + 1) * s]
        lengths = [hi - lo for lo, hi in zip(cuts[:-1], cuts[1:])]
        parts = [F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True, enable_gqa=gqa)[0]
                 for qd, kd, vd in zip(qb.split(lengths, 1), kb.split(lengths, 1), vb.split(lengths, 1))]
        outs.append(torch.cat(parts, dim=1))
    return torch.stack(outs) if len(outs) > 1 else outs[0][None]


def _varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = docs.cu_seqlens.to(q.device)
    return varlen_attn(q, k, v, cu, cu, docs.max_len, docs.max_len, window_size=(-1, 0),
                       enable_gqa=q.shape[1] != k.shape[1])


_NPU_CAUSAL_MASK: dict[torch.device, torch.Tensor] = {}


def _npu_fusion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """Ascend's fused attention: sparse_mode 3 (causal, lower-right aligned per document) takes the
    fixed 2048 x 2048 upper-triangular mask, as MindSpeed passes it."""
    import torch_npu

    mask = _NPU_CAUSAL_MASK.get(q.device)
    if mask is None:
        mask = _NPU_CAUSAL_MASK[q.device] = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1)
    ends = list(docs.bounds[1:])
    return torch_npu.npu_fusion_attention(
        q, k, v, q.shape[1], input_layout="TND", atten_mask=mask, scale=q.shape[-1] ** -0.5,
        sparse_mode=3, actual_seq_qlen=ends, actual_seq_kvlen=ends)[0]
