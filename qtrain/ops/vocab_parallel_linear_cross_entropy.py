"""LM head + cross-entropy over a vocabulary shard, chunk by chunk: no [tokens, vocab] logits.

The reference implementation behind `linear_cross_entropy`, on every layout: one device is a
vocabulary "group" of one (group=None); under tensor parallelism each rank holds rows
[vocab_start, vocab_start + V/TP) of the LM-head weight. Tokens go in chunks (`chunk_tokens`):

1. logits of the chunk on this shard, [C, V/TP] in float32;
2. per token, the shard's log-sum-exp (its max and sum-exp) and the target logit when the
   shard owns the target; one all-gather of those two numbers over the group gives the full
   log-sum-exp (the log-sum-exp of the shards') and the target logit: exact, no logits move;
3. the loss is a scalar, so its gradients are computed right away: softmax - one_hot over
   the shard, written over the chunk's logits; grad hidden += g @ W_shard (a partial sum over
   shards), grad W_shard += g.T @ h.

Backward only scales the two stored gradients by the upstream gradient and hands them over
(no copy). Peak memory is one chunk's logits plus the two gradients, never the whole
[tokens, V/TP] block. grad hidden is summed over the group once, at the end: all-reduced
when every rank holds all tokens, or reduce-scattered back when the hidden states arrived
sequence-sharded (sequence parallel). Those are all-gathered once, rank-major (the labels are
permuted to match; the loss is a sum over tokens, so their order does not matter).

Precision: logits, log-sum-exp and the softmax gradient in float32; the matmuls in the
inputs' dtype (bf16 under --bf16, accumulating in fp32 inside each one); grad W accumulates
over chunks in W's dtype, one rounding per chunk (as Liger-Kernel's default; an fp32
accumulator would cost 4 bytes per LM-head weight, 1.16 GiB for Qwen3-1.7B).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch 2.13's names of all_gather_into_tensor / reduce_scatter_tensor (older releases: only those)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# fp32 logits elements per chunk (512 MiB): Qwen3's 151,936-word vocabulary gives 768 tokens
# per chunk on one device, 1,664 per rank under TP 2.
CHUNK_LOGITS = 2 ** 27


def chunk_tokens(vocab_shard: int) -> int:
    """Tokens per chunk for a vocabulary shard of `vocab_shard` words: as many as keep the chunk's
    fp32 logits within CHUNK_LOGITS elements, a multiple of 128 when at least 128 fit."""
    c = max(1, CHUNK_LOGITS // vocab_shard)
    return c // 128 * 128 if c >= 128 else c


def working_bytes(tokens: int, vocab_shard: int, hidden: int, bytes_per_el: int,
                  sequence_parallel: bool = False) -> float:
    """Peak bytes this op allocates beyond its inputs and the LM-head weight gradient it returns,
    for `tokens` tokens (the whole sequence, gathered, under sequence parallel): one chunk's fp32
    logits (+ a bf16/fp16 copy of its gradient for the matmuls) and grad hidden; under sequence
    parallel also the gathered hidden states. (`tests/parallel/test_plan.py` measures it.)"""
    c = min(tokens, chunk_tokens(vocab_shard))
    chunk = c * vocab_shard * (4 + (bytes_per_el if bytes_per_el < 4 else 0))
    return chunk + tokens * hidden * bytes_per_el * (2 if sequence_parallel else 1)


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ W.T, labels), W split by vocabulary over `group`.

    hidden [N, H] (under `sequence_sharded`: this rank's N/TP tokens, gathered rank-major),
    weight [V/TP, H] (this rank's rows, starting at word `vocab_start`), labels [N] of all N
    tokens (in the gathered order). Returns the float32 loss sum, the same on every rank of the
    group. chunk_size: tokens per chunk (`chunk_tokens`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, group: Optional[dist.ProcessGroup], vocab_start: int,
                sequence_sharded: bool, ignore_index: int, chunk_size: int, need_grad_hidden: bool,
                need_grad_weight: bool):
        ranks = dist.get_world_size(group) if group is not None else 1
        local_hidden = hidden
        if sequence_sharded and ranks > 1:
            hidden = hidden.new_empty((hidden.shape[0] * ranks, hidden.shape[1]))
            _all_gather(hidden, local_hidden.contiguous(), group=group)
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else None
        grad_weight = torch.zeros_like(weight) if need_grad_weight else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            loss += _chunk(hidden[start:end], weight, labels[start:end], group, ranks, vocab_start, ignore_index,
                           grad_hidden[start:end] if grad_hidden is not None else None, grad_weight)
        if grad_hidden is not None and ranks > 1:
            grad_hidden = _sum_over_shards(grad_hidden, local_hidden, group, sequence_sharded)
        ctx.grads = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # hand the buffers over: autograd can then keep them as .grad without a copy
        for g in (grad_hidden, grad_weight):
            if g is not None:
                g.mul_(grad_out.to(g.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _chunk(h, weight, y, group, ranks: int, vocab_start: int, ignore_index: int,
           grad_hidden: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Loss sum of one chunk of tokens; writes its grad hidden rows and adds to grad weight. (A
    function of its own so that the chunk's logits are freed before the next chunk's exist.)"""
    vocab_shard = weight.shape[0]
    logits = (h @ weight.t()).float()
    valid = y != ignore_index
    local = y - vocab_start
    owned = valid & (local >= 0) & (local < vocab_shard)
    index = torch.where(owned, local, 0)[:, None]
    picked = logits.gather(1, index).squeeze(1) * owned
    shard_max = logits.amax(1)
    exp = logits.sub_(shard_max[:, None]).exp_()  # in place: no second chunk-sized buffer
    del logits
    shard_lse = shard_max + exp.sum(1).log()
    lse, picked = _combine_over_shards(shard_lse, picked, group, ranks) if ranks > 1 else (shard_lse, picked)
    loss = ((lse - picked) * valid).sum()
    if grad_hidden is None and grad_weight is None:
        return loss
    # d loss / d logits = softmax - one_hot (rows of ignored labels: 0), over the shard, in place
    grad = exp.mul_(((shard_max - lse).exp() * valid)[:, None])
    del exp
    grad.scatter_add_(1, index, -owned[:, None].to(grad.dtype))
    grad = grad.to(weight.dtype)  # frees the fp32 buffer when it is a copy
    if grad_hidden is not None:
        torch.mm(grad, weight, out=grad_hidden)
    if grad_weight is not None:
        grad_weight.addmm_(grad.t(), h)
    return loss


def _combine_over_shards(shard_lse: torch.Tensor, picked: torch.Tensor, group, ranks: int):
    """Full log-sum-exp and target logit per token from every shard's: one all-gather of [2, C]."""
    mine = torch.stack([shard_lse, picked])
    every = mine.new_empty((ranks * 2, mine.shape[1]))  # concatenated along dim 0 (what every backend takes)
    _all_gather(every, mine, group=group)
    every = every.view(ranks, 2, -1)
    return torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(0)


def _sum_over_shards(grad_hidden: torch.Tensor, local_hidden: torch.Tensor, group, sequence_sharded: bool):
    """Each shard's partial grad hidden summed over the group: reduce-scattered back to this rank's
    tokens when they arrived sequence-sharded, else all-reduced (every rank holds all tokens)."""
    if not sequence_sharded:
        dist.all_reduce(grad_hidden, group=group)
        return grad_hidden
    mine = local_hidden.new_empty(local_hidden.shape)
    _reduce_scatter(mine, grad_hidden, group=group)
    return mine
