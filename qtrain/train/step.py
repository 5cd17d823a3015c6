"""One optimizer step, the same on every layout: each micro-batch's forward and backward (or the
pipeline schedule over all of them), gradient clipping and the optimizer step.

The loss of a micro-batch is (sum of its token losses, its number of trained tokens), computed
by `loss_sum`: the model's LM head and cross-entropy fused in chunks without materialising the
logits, on every layout (vocab-parallel under TP; the last pipeline stage runs the same loss
inside the schedule). A `LossWeight` turns that pair into the value whose gradient the
micro-batch contributes: by default the mean over its trained tokens (`mean_loss`, Megatron's
pretraining loss and MindSpeed-LLM's SFT loss); `qtrain sft --calculate-per-token-loss` divides
by the tokens of the whole global batch instead. Under pipeline parallelism the schedule turns
the last stage's loss sum into the mean itself (`Pipeline.train_step`), so only `mean_loss`
runs there.

An `objective` replaces the token loss altogether (preference training, qtrain.train.preference):
it computes each micro-batch's loss (`micro_batch_loss`) and, under PP, runs the schedule itself
(`pipeline_loss`).

Loss and gradient norm stay on the device: the loop reads them only when it logs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch

from qtrain.errors import ConfigError
from qtrain.labels import IGNORE_INDEX
from qtrain.parallel import ParallelState
from qtrain.parallel.grads import clip_grad_norm_

Batch = dict[str, torch.Tensor]
# (sum of token losses, trained tokens in the micro-batch, the micro-batch) -> the loss to backpropagate
LossWeight = Callable[[torch.Tensor, int, Batch], torch.Tensor]


def mean_loss(total: torch.Tensor, count: int, batch: Batch) -> torch.Tensor:  # noqa: ARG001
    """Mean over the micro-batch's trained tokens; 0 (not NaN) for a micro-batch without any."""
    return total / max(count, 1)


def trained_tokens(batch: Batch) -> int:
    """Positions whose label counts (labels arrive on the host, so this waits on no device)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def model_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's keyword inputs from a batch: input_ids, and position_ids / attention_mask /
    cu_seqlens when the data has them (packed documents, context-parallel slices)."""
    out = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    for key in ("position_ids", "attention_mask"):
        if batch.get(key) is not None:
            out[key] = batch[key].to(device, non_blocking=True)
    if batch.get("cu_seqlens") is not None:  # read on the host (the model turns it into Documents)
        out["cu_seqlens"] = batch["cu_seqlens"]
    return out


@contextlib.contextmanager
def pipeline_inputs(pipeline, micro_batches: Sequence[Batch], device: torch.device):
    """The micro-batches' position_ids / cu_seqlens (packed documents, CP slices) as inputs of
    every pipeline stage while the schedule runs."""
    joined = {k: torch.cat([b[k] for b in micro_batches]) for k in ("position_ids", "cu_seqlens")
              if micro_batches[0].get(k) is not None}
    # cu_seqlens stays on the host, where the model reads the document bounds
    pipeline.inputs = {k: v if k == "cu_seqlens" else v.to(device) for k, v in joined.items()}
    try:
        yield
    finally:
        pipeline.inputs = {}


def loss_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Sum of the token losses of one (already context-sharded) micro-batch, float32: the model's
    chunked LM-head loss, computed inside its forward (where FSDP has gathered the LM head)."""
    labels = batch["labels"].to(device, non_blocking=True)
    return model(**model_inputs(batch, device), labels=labels, loss_reduction="sum").float()


def forward_backward(model: torch.nn.Module, state: ParallelState, batch: Batch, device: torch.device,
                     num_microbatches: int, loss_weight: LossWeight = mean_loss,
                     objective: Optional[Any] = None, moe: Optional[Any] = None) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients accumulate scaled by 1/num_microbatches,
    so the step sees the mean over the micro-batches. Returns the weighted loss (fp32, detached);
    `moe` (qtrain.train.moe.MoeTraining) adds the load-balancing loss to what is backpropagated."""
    if objective is not None:  # its own loss (it takes the context-parallel slice itself)
        loss = objective.micro_batch_loss(model, state, batch, device)
    else:
        # Under context parallel each rank sums the losses of its slice; the weight divides by the
        # whole micro-batch's tokens, and the CP factor undoes FSDP's gradient mean over CP ranks.
        count = trained_tokens(batch)
        batch = state.prepare_batch(batch)  # this rank's context-parallel slice, if any
        loss = loss_weight(loss_sum(model, batch, device) * state.dims.cp, count, batch)
    extra = moe.extra_loss(model) if moe is not None else None
    ((loss if extra is None else loss + extra) / num_microbatches).backward()
    return loss.detach()


def train_step(model: torch.nn.Module, state: ParallelState, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[Batch], device: torch.device, clip_grad: float,
               loss_weight: LossWeight = mean_loss,
               objective: Optional[Any] = None, moe: Optional[Any] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches of the global batch.

    Returns (loss, grad norm) as float32 device tensors: the mean of the micro-batches' weighted
    losses on this rank (the loop averages it over data-parallel ranks when it logs), and the
    global gradient norm before clipping to `clip_grad` (0: no clipping).
    """
    n = len(micro_batches)
    if moe is not None:
        moe.begin_step(model, n, pipeline=state.pipeline is not None, cp_group=state.cp_group)
    if state.pipeline is not None and objective is not None:
        loss = objective.pipeline_loss(state, micro_batches, device)
    elif state.pipeline is not None:
        if loss_weight is not mean_loss:
            raise ConfigError("this loss (e.g. --calculate-per-token-loss) is not available with pipeline "
                              "parallelism: the schedule computes each micro-batch's mean token loss")
        # whole rows' trained tokens, before CP slicing
        row_tokens = torch.cat([(b["labels"] != IGNORE_INDEX).sum(1) for b in micro_batches]).to(device)
        micro_batches = [state.prepare_batch(b) for b in micro_batches]
        input_ids = torch.cat([b["input_ids"] for b in micro_batches]).to(device)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(device)
        with pipeline_inputs(state.pipeline, micro_batches, device):
            loss = state.pipeline.train_step(input_ids, labels, row_tokens if state.dims.cp > 1 else None,
                                             state.dims.cp)
    else:
        loss = torch.zeros((), dtype=torch.float32, device=device)
        for i, batch in enumerate(micro_batches):
            # Reduce gradients over data-parallel ranks once, after the last micro-batch.
            model.set_requires_gradient_sync(i == n - 1)
            loss += forward_backward(model, state, batch, device, n, loss_weight, objective, moe)
        loss /= n
    grad_norm = clip_grad_norm_(model, clip_grad, state)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm.to(device)  # on the host with --optimizer-cpu-offload


@torch.no_grad()
def eval_step(model: torch.nn.Module, state: ParallelState, micro_batches: Sequence[Batch],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: (sum of token losses, trained tokens) of this rank's micro-batches, float64
    on the device; the pipeline's eval schedule under PP. The caller sums over `state.loss_group`."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    if state.pipeline is not None:
        micro_batches = [state.prepare_batch(b) for b in micro_batches]
        input_ids = torch.cat([b["input_ids"] for b in micro_batches]).to(device)
        labels = torch.cat([b["labels"] for b in micro_batches]).to(device)
        with pipeline_inputs(state.pipeline, micro_batches, device):
            s, c = state.pipeline.eval_loss(input_ids, labels)
        return total + s.double(), count + c.double()
    for batch in micro_batches:
        batch = state.prepare_batch(batch)
        total += loss_sum(model, batch, device).double()
        count += trained_tokens(batch)
    return total, count
