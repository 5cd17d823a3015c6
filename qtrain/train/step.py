"""One micro-batch: forward, loss, backward. The pipeline-parallel path will branch here."""

from __future__ import annotations

import contextlib

import torch

from qtrain.ops.cross_entropy import cross_entropy


def autocast_context(device: torch.device, bf16: bool, sharded: bool):
    """bf16 autocast for an unsharded model; FSDP's MixedPrecisionPolicy casts a sharded one."""
    if bf16 and not sharded:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_microbatches: int,
                     device: torch.device, bf16: bool, sharded: bool) -> torch.Tensor:
    """Loss of one micro-batch (mean over its trained tokens, fp32, detached); grads accumulate
    scaled by 1/num_microbatches so the step sees the mean over the global batch."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    with autocast_context(device, bf16, sharded):
        logits = model(input_ids)
    loss = cross_entropy(logits, labels)
    (loss / num_microbatches).backward()
    return loss.detach()


@torch.no_grad()
def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, bf16: bool,
                 sharded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of trained tokens) of one evaluation micro-batch."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    with autocast_context(device, bf16, sharded):
        logits = model(input_ids)
    total = cross_entropy(logits, labels, reduction="sum")
    return total, (labels != -100).sum()
