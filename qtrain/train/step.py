"""One optimizer step's forward and backward: per micro-batch, or through the pipeline schedule."""

from __future__ import annotations

import contextlib

import torch

from qtrain.ops.cross_entropy import cross_entropy
from qtrain.parallel import loss_scope, parallel_state, prepare_batch


def autocast_context(device: torch.device, bf16: bool, sharded: bool):
    """bf16 autocast for an unsharded model; FSDP's MixedPrecisionPolicy casts a sharded one."""
    if bf16 and not sharded:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_microbatches: int,
                     device: torch.device, bf16: bool, sharded: bool) -> torch.Tensor:
    """Loss of one micro-batch (mean over its trained tokens, fp32, detached); grads accumulate
    scaled by 1/num_microbatches so the step sees the mean over the global batch."""
    batch = prepare_batch(model, batch)  # this rank's context-parallel slice, if any
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch.get("position_ids")
    position_ids = None if position_ids is None else position_ids.to(device)
    if _fused_loss(model):
        with autocast_context(device, bf16, sharded):
            loss = model(input_ids, position_ids=position_ids, labels=labels)
        (loss / num_microbatches).backward()
        return loss.detach()
    with autocast_context(device, bf16, sharded):
        logits = model(input_ids, position_ids=position_ids)
    with loss_scope(model):  # vocab-parallel loss when the LM head is tensor-parallel
        loss = cross_entropy(logits, labels)
        (loss / num_microbatches).backward()
    return _local(loss.detach())


def _fused_loss(model: torch.nn.Module) -> bool:
    """The model computes its loss without materialising the logits (LM head + cross-entropy in
    chunks), except when the LM head is vocab-parallel: then the logits stay sharded DTensors
    and the loss runs under loss_parallel()."""
    state = parallel_state(model)
    return state is None or not state.vocab_parallel


def pipeline_forward_backward(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                              device: torch.device) -> torch.Tensor:
    """All micro-batches of a step through the pipeline schedule; the mean micro-batch loss."""
    input_ids = torch.cat([b["input_ids"] for b in micro_batches]).to(device)
    labels = torch.cat([b["labels"] for b in micro_batches]).to(device)
    return parallel_state(model).pipeline.train_step(input_ids, labels)


def uses_pipeline(model: torch.nn.Module) -> bool:
    state = parallel_state(model)
    return state is not None and state.pipeline is not None


@torch.no_grad()
def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool,
                 sharded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of trained tokens) of one evaluation micro-batch."""
    batch = prepare_batch(model, batch)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch.get("position_ids")
    position_ids = None if position_ids is None else position_ids.to(device)
    with autocast_context(device, bf16, sharded):
        if _fused_loss(model):
            return model(input_ids, position_ids=position_ids, labels=labels, loss_reduction="sum"), \
                (labels != -100).sum()
        logits = model(input_ids, position_ids=position_ids)
    with loss_scope(model):
        total = _local(cross_entropy(logits, labels, reduction="sum"))
    return total, (labels != -100).sum()
