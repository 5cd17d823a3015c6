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

Per-token losses (`VocabParallelTokenCrossEntropy`, reduction "none": what preference training
sums into each sequence's log-probability) cannot take their gradients in the forward: the
upstream gradient differs per token, and grad W = sum_t g_t (softmax - one_hot)_t h_t^T cannot be
rescaled afterwards. So the forward keeps only each token's log-sum-exp (one float) and the
backward recomputes each chunk's logits, one more [C, V/TP] matmul than the summed loss, with the
same chunking, the same float32 softmax gradient and the same sums over shards.
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
    exp, shard_max, lse, picked, valid, owned, index = _chunk_forward(h, weight, y, group, ranks, vocab_start,
                                                                      ignore_index)
    loss = ((lse - picked) * valid).sum()
    if grad_hidden is None and grad_weight is None:
        return loss
    buffer = [exp]
    del exp  # _chunk_backward frees it once its low-precision copy exists
    _chunk_backward(buffer, shard_max, lse, valid, owned, index, h, weight, grad_hidden, grad_weight)
    return loss


def _targets(y, vocab_start: int, vocab_shard: int, ignore_index: int):
    """(counted, owned by this shard, index into the shard's columns [C, 1]) of a chunk's labels."""
    valid = y != ignore_index
    local = y - vocab_start
    owned = valid & (local >= 0) & (local < vocab_shard)
    return valid, owned, torch.where(owned, local, 0)[:, None]


def _shard_exp(logits: torch.Tensor):
    """(exp(logits - row max) written over the fp32 logits, row max): no second chunk-sized buffer."""
    shard_max = logits.amax(1)
    return logits.sub_(shard_max[:, None]).exp_(), shard_max


def _chunk_forward(h, weight, y, group, ranks: int, vocab_start: int, ignore_index: int):
    """A chunk's shard logits as (exp(logits - shard max), shard max), the full log-sum-exp and
    target logit per token (combined over the shards), and its label masks."""
    valid, owned, index = _targets(y, vocab_start, weight.shape[0], ignore_index)
    logits = (h @ weight.t()).float()
    picked = logits.gather(1, index).squeeze(1) * owned
    exp, shard_max = _shard_exp(logits)
    del logits
    shard_lse = shard_max + exp.sum(1).log()
    lse, picked = _combine_over_shards(shard_lse, picked, group, ranks) if ranks > 1 else (shard_lse, picked)
    return exp, shard_max, lse, picked, valid, owned, index


def _chunk_backward(buffer: list, shard_max, lse, scale, owned, index, h, weight,
                    grad_hidden: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor]) -> None:
    """d loss / d logits = (softmax - one_hot) x each token's upstream gradient `scale` (0 on ignored
    labels), over the shard, written over the chunk's exp(logits - shard max), handed over in
    `buffer` (a list, so that no caller keeps the fp32 block alive during the matmuls); then grad
    hidden rows = g @ W_shard (written) and grad W_shard += g.T @ h."""
    grad = buffer.pop().mul_(((shard_max - lse).exp() * scale)[:, None])
    grad.scatter_add_(1, index, -(owned * scale)[:, None].to(grad.dtype))
    grad = grad.to(weight.dtype)  # frees the fp32 buffer when it is a copy
    if grad_hidden is not None:
        torch.mm(grad, weight, out=grad_hidden)
    if grad_weight is not None:
        grad_weight.addmm_(grad.t(), h)


class VocabParallelTokenCrossEntropy(torch.autograd.Function):
    """Per-token cross_entropy(hidden @ W.T, labels) (0 on ignored labels), W split by vocabulary over
    `group`; arguments as VocabParallelLinearCrossEntropy's, plus `out_shape` (the labels' shape
    [B, S]). Returns a fresh float32 tensor of that shape, the same on every rank of the group,
    in the labels' order (sequence-sharded hidden states are gathered rank-major; the result is
    put back). Gradients: recomputed chunk by chunk in backward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group: Optional[dist.ProcessGroup], vocab_start: int,
                sequence_sharded: bool, ignore_index: int, chunk_size: int, out_shape: tuple[int, ...]):
        ranks = dist.get_world_size(group) if group is not None else 1
        local_hidden = hidden
        if sequence_sharded and ranks > 1:
            hidden = hidden.new_empty((hidden.shape[0] * ranks, hidden.shape[1]))
            _all_gather(hidden, local_hidden.contiguous(), group=group)
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            exp, _, lse, picked, valid, _, _ = _chunk_forward(hidden[start:end], weight, labels[start:end], group,
                                                              ranks, vocab_start, ignore_index)
            del exp
            losses[start:end] = (lse - picked) * valid
            lse_all[start:end] = lse
        ctx.save_for_backward(hidden, weight, labels, lse_all)
        ctx.local_shape, ctx.out_shape = local_hidden.shape, out_shape
        ctx.args = (group, ranks, vocab_start, sequence_sharded, ignore_index, chunk_size)
        out = torch.empty(out_shape, dtype=torch.float32, device=losses.device)
        return out.copy_(_to_label_order(losses, out_shape, ranks if sequence_sharded else 1))

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse_all = ctx.saved_tensors
        group, ranks, vocab_start, sequence_sharded, ignore_index, chunk_size = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = _to_gathered_order(grad_out.float(), ranks if sequence_sharded else 1)
        grad_hidden = hidden.new_empty(hidden.shape) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_w else None
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            _token_chunk_backward(hidden[start:end], weight, labels[start:end], lse_all[start:end], g[start:end],
                                  vocab_start, ignore_index, grad_hidden[start:end] if need_h else None,
                                  grad_weight)
        if need_h and ranks > 1:
            local = hidden.new_empty(ctx.local_shape) if sequence_sharded else hidden
            grad_hidden = _sum_over_shards(grad_hidden, local, group, sequence_sharded)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _token_chunk_backward(h, weight, y, lse, g, vocab_start: int, ignore_index: int,
                          grad_hidden: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor]) -> None:
    """One chunk's gradients for per-token upstream gradients `g`, from its recomputed logits and
    the log-sum-exp kept by the forward (no collective: each shard's softmax needs only that)."""
    valid, owned, index = _targets(y, vocab_start, weight.shape[0], ignore_index)
    exp, shard_max = _shard_exp((h @ weight.t()).float())
    buffer = [exp]
    del exp
    _chunk_backward(buffer, shard_max, lse, g * valid, owned, index, h, weight, grad_hidden, grad_weight)


def _to_label_order(values: torch.Tensor, shape: tuple[int, ...], ranks: int) -> torch.Tensor:
    """Per-token values in the gathered order (rank-major [TP, B, S/TP] when sequence-sharded) -> `shape`."""
    if ranks == 1:
        return values.view(shape)
    b, s = shape
    return values.view(ranks, b, s // ranks).transpose(0, 1).reshape(b, s)


def _to_gathered_order(values: torch.Tensor, ranks: int) -> torch.Tensor:
    """The inverse of _to_label_order, flattened."""
    if ranks == 1:
        return values.reshape(-1)
    b, s = values.shape
    return values.reshape(b, ranks, s // ranks).transpose(0, 1).reshape(-1)


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
