"""Megatron-core's load-balancing loss: one Switch-Transformer loss per MoE layer, its gradient
attached to the layer's output (megatron.core.transformer.moe: switch_load_balancing_loss_func,
MoEAuxLossAutoScaler), used when the coefficient comes from `--moe-aux-loss-coeff`.

Per layer, over the T tokens of the micro-batch this rank routes (Megatron's router for Qwen3:
softmax scores in fp32, top-k of them; the loss reads the FULL softmax scores, not the
renormalised top-k weights):  loss = E / (k T^2) * sum_e (sum_t p_te) * (token copies sent to e).
Each layer adds coeff * its loss to the training loss. Attaching the gradient to the layer's
activations (identity forward, an extra gradient in backward) needs no change to the pipeline
schedule or to recompute: the gradient flows wherever the layer's output does. Under context
parallelism the counts and T are the whole sequence's (summed over the CP ranks, as Megatron sums
them over its TP x CP group) and each rank's loss is its tokens' share.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def switch_load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int,
                               num_tokens: Optional[int] = None) -> torch.Tensor:
    """One layer's loss without the coefficient: probs [T, E] float32 (full softmax scores of this
    rank's tokens), counts [E] (token copies routed to each expert) over `num_tokens` tokens (default
    T; under context parallelism the whole sequence's counts and tokens, as Megatron sums them over
    its TP x CP group: each rank's loss is then its tokens' share and the ranks' losses add up)."""
    num_experts = probs.shape[1]
    num_tokens = probs.shape[0] if num_tokens is None else num_tokens
    return torch.sum(probs.sum(0) * counts.to(probs.dtype)) * (num_experts / (top_k * num_tokens * num_tokens))


class LayerAuxLoss:
    """Attaches coeff * one layer's loss to its output and keeps, for the log, the loss (without
    the coefficient) and the expert counts of each micro-batch that was backpropagated.

    `grad_scale` is the factor the main loss's gradient carries per micro-batch: 1/num_microbatches
    when the loop divides each micro-batch's loss by it, 1 under the pipeline schedule (which
    divides all gradients by num_microbatches after the step). Values are recorded in backward,
    which runs once per micro-batch even when the layer's forward is recomputed; of a step's records
    only the last `num_microbatches` count: torch's pipeline schedule, on its first step, first runs
    a forward and backward of placeholder tensors to infer shapes (its records come first)."""

    def __init__(self, coeff: float, cp_group: Optional[dist.ProcessGroup] = None):
        self.coeff, self.grad_scale, self.num_microbatches = coeff, 1.0, 0
        self.cp_group = cp_group  # context parallel: counts summed over it, each rank's loss a share
        self.cp = dist.get_world_size(cp_group) if cp_group is not None else 1
        self.loss_sum: Optional[torch.Tensor] = None
        self.counts_sum: Optional[torch.Tensor] = None
        self.micro_batches = 0
        self._step: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (loss, counts) records

    def begin_step(self, grad_scale: float, num_microbatches: int) -> None:
        self._fold()
        self.grad_scale, self.num_microbatches = grad_scale, num_microbatches

    def attach(self, y: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
        if not (torch.is_grad_enabled() and y.requires_grad):
            return y  # evaluation: nothing to train, nothing to log
        tokens = probs.shape[0]
        if self.cp_group is not None:
            counts = counts.clone()
            dist.all_reduce(counts, group=self.cp_group)
            tokens *= self.cp
        return _AttachAuxLoss.apply(y, switch_load_balancing_loss(probs, counts, top_k, tokens), counts, self)

    def record(self, loss: torch.Tensor, counts: torch.Tensor) -> None:
        self._step.append((loss, counts))

    def _fold(self) -> None:
        for loss, counts in self._step[-self.num_microbatches:] if self.num_microbatches else self._step:
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.counts_sum = counts if self.counts_sum is None else self.counts_sum + counts
            self.micro_batches += 1
        self._step = []

    def take(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
        self._fold()
        out = (self.loss_sum, self.counts_sum, self.micro_batches)
        self.loss_sum, self.counts_sum, self.micro_batches = None, None, 0
        return out


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer output; in backward, d(coeff * loss) scaled like the main loss."""

    @staticmethod
    def forward(ctx, y, loss, counts, sink: LayerAuxLoss):
        ctx.save_for_backward(loss, counts)
        ctx.sink = sink
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        loss, counts = ctx.saved_tensors
        sink = ctx.sink
        # under CP a rank's loss is its share of the layer's: recorded x CP, so that the log's mean over
        # the data x CP ranks is the layer's loss; its gradient x CP as the token loss's (FSDP averages
        # gradients over the CP ranks, where the shares add up)
        sink.record(loss.detach().float() * sink.cp, counts.detach())
        return grad_y, torch.full_like(loss, sink.coeff * sink.grad_scale * sink.cp), None, None
