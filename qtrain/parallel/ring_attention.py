"""Ring attention (MindSpeed's `megatron_cp_algo`): K/V blocks travel around the context-parallel
group while each rank attends its own queries to every block in turn.

Step s on CP rank r holds the K/V of rank (r - s) mod CP. Each step gives a partial output and its
log-sum-exp (LSE) over that block; partials merge exactly by the online-softmax rule
out = sum_s exp(lse_s - lse) out_s, lse = log sum_s exp(lse_s). Which query may see which key is a
BlockMask from global positions (causal) and document ids (packed samples), made a chunk of rows
at a time, so the same code serves every load-balancing order and document layout
(qtrain.parallel.context).

The backward is flash attention's, one block at a time: with the final output and LSE, a block's
probabilities are recomputed as exp(scores - lse), and dQ, dK, dV follow; the K/V blocks go round
the ring again with their gradients accumulating beside them, and after CP hops each dK/dV is
back on its owner. Per step a rank holds one [Sq, Sk] score block per head, never the whole
sequence's, in chunks of query rows (SCORE_CHUNK_BYTES of scores). Blocks are computed with
matmuls in float32 (any device and torch.distributed backend: gloo, NCCL, HCCL), not a fused
kernel; blocks wholly masked out (zigzag causal, other documents) are skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def ring_shift(x: torch.Tensor, group) -> list:
    """Start sending x to the next CP rank and receiving the previous one's; returns
    (requests, buffer): wait on the requests before reading the buffer."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    buf = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, group=group, group_peer=(rank + 1) % cp),
           dist.P2POp(dist.irecv, buf, group=group, group_peer=(rank - 1) % cp)]
    return [dist.batch_isend_irecv(ops), buf]


def _wait(pending) -> torch.Tensor:
    for req in pending[0]:
        req.wait()
    return pending[1]


class BlockMask:
    """Which local query (global position q_pos [Sq], document q_doc [B, Sq]) may see which key
    (kv_pos [Sk], kv_doc [B, Sk]) of one K/V block: causal by position, within one document. Built a
    chunk of query rows at a time (`mask[:, rows]` -> bool [B|1, rows, Sk]), so no [Sq, Sk] mask is
    kept between the forward and the backward."""

    def __init__(self, q_pos: torch.Tensor, kv_pos: torch.Tensor, q_doc: Optional[torch.Tensor] = None,
                 kv_doc: Optional[torch.Tensor] = None) -> None:
        self.q_pos, self.kv_pos, self.q_doc, self.kv_doc = q_pos, kv_pos, q_doc, kv_doc

    def __getitem__(self, index) -> torch.Tensor:
        rows = index[1]
        allowed = (self.kv_pos[None, :] <= self.q_pos[rows, None])[None]
        if self.q_doc is not None:
            allowed = allowed & (self.q_doc[:, rows, None] == self.kv_doc[:, None, :])
        return allowed

    def empty(self) -> bool:
        """No query sees any key: every key comes after every query or, in every sample, the two
        sides' document ranges are disjoint (a document is a run of positions). Conservative."""
        if bool(self.kv_pos.min() > self.q_pos.max()):
            return True
        if self.q_doc is None:
            return False
        q_lo, q_hi = self.q_doc.min(1).values, self.q_doc.max(1).values
        k_lo, k_hi = self.kv_doc.min(1).values, self.kv_doc.max(1).values
        return bool(((q_hi < k_lo) | (k_hi < q_lo)).all())


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hkv, g, Sq, D], k [B, Hkv, Sk, D], mask bool [B|1, Sq, Sk] -> masked scores, float32."""
    s = torch.matmul(q.float(), k.float().unsqueeze(2).transpose(-1, -2)) * scale
    return s.masked_fill(~mask[:, None, None], float("-inf"))


SCORE_CHUNK_BYTES = 2 ** 28  # float32 scores of one chunk of query rows against a K/V block


def _row_chunks(q: torch.Tensor, sk: int):
    """Slices of query rows whose [B, H, rows, Sk] float32 scores fit SCORE_CHUNK_BYTES."""
    b, hkv, g, sq, _ = q.shape
    rows = max(1, SCORE_CHUNK_BYTES // (4 * b * hkv * g * sk))
    return [slice(r, min(r + rows, sq)) for r in range(0, sq, rows)]


def _block_forward(q, k, v, mask, scale):
    """(out [B, Hkv, g, Sq, D] float32, lse [B, Hkv, g, Sq]) of one block; fully masked rows: 0, -inf."""
    outs, lses = [], []
    for rows in _row_chunks(q, k.shape[2]):
        s = _scores(q[..., rows, :], k, mask[:, rows], scale)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(torch.matmul(p, v.float().unsqueeze(2)))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _merge(out, lse, out_i, lse_i):
    if out is None:
        return out_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    safe = torch.where(torch.isinf(new), 0.0, new)
    return out * torch.exp(lse - safe)[..., None] + out_i * torch.exp(lse_i - safe)[..., None], new


def _block_backward(q, k, v, mask, dout, lse, delta, scale, dq, dk, dv):
    """Adds one block's gradients into dq [B, Hkv, g, Sq, D], dk, dv [B, Hkv, Sk, D] (float32)."""
    kf, vf = k.float().unsqueeze(2), v.float().unsqueeze(2)
    for rows in _row_chunks(q, k.shape[2]):
        s = _scores(q[..., rows, :], k, mask[:, rows], scale)
        p = torch.exp(s - lse[..., rows, None])  # the final LSE: this block's share of the full softmax
        dv += torch.matmul(p.transpose(-1, -2), dout[..., rows, :]).sum(2)
        ds = p * (torch.matmul(dout[..., rows, :], vf.transpose(-1, -2)) - delta[..., rows, None])
        dq[..., rows, :] += torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q[..., rows, :].float()).sum(2) * scale


class RingAttention(torch.autograd.Function):
    """out = softmax-attention of the local q [B, Hq, Sq, D] over the K/V [B, Hkv, Sk, D] of every
    rank of `group`; masks[s]: the BlockMask of the block held at step s (None: all masked)."""

    @staticmethod
    def forward(ctx, q, k, v, group, masks: list[Optional[BlockMask]]):
        cp = dist.get_world_size(group)
        b, hq, sq, d = q.shape
        hkv = k.shape[1]
        scale = d ** -0.5
        qg = q.view(b, hkv, hq // hkv, sq, d)
        kv = torch.stack([k, v]).contiguous()
        out = lse = None
        for step in range(cp):
            pending = ring_shift(kv, group) if step < cp - 1 else None
            if masks[step] is not None:
                out, lse = _merge(out, lse, *_block_forward(qg, kv[0], kv[1], masks[step], scale))
            if pending is not None:
                kv = _wait(pending)
        ctx.group, ctx.masks, ctx.scale = group, masks, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.view(b, hq, sq, d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, masks, scale = ctx.group, ctx.masks, ctx.scale
        cp = dist.get_world_size(group)
        b, hq, sq, d = q.shape
        hkv = k.shape[1]
        qg = q.view(b, hkv, hq // hkv, sq, d)
        dout = dout.float().reshape(b, hkv, hq // hkv, sq, d)
        delta = (dout * out).sum(-1)
        dq = torch.zeros_like(out)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(cp):
            pending_kv = ring_shift(kv, group) if step < cp - 1 else None
            if masks[step] is not None:
                _block_backward(qg, kv[0], kv[1], masks[step], dout, lse, delta, scale, dq, dkv[0], dkv[1])
            dkv = _wait(ring_shift(dkv, group))  # the gradients travel with their block; after CP hops, home
            if pending_kv is not None:
                kv = _wait(pending_kv)
        return dq.view(b, hq, sq, d).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None
