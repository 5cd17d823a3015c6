"""Full (unsharded) tensors and sharded parameters: a DTensor's global value, and a full tensor
written into a parameter that may be a DTensor shard.

Every rank holds the same full value (it generated it from a seed, or read it from a checkpoint
file through the shared page cache) and keeps only its own slice: no collective, and at most one
full parameter in memory at a time. Used to initialise and to load weights after sharding.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The global value of a DTensor (collective over its mesh); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full, where `param` is a plain tensor or a DTensor (TP and/or FSDP shard) whose
    global shape is full.shape; dtype and device are converted on the way."""
    if isinstance(param, DTensor):
        local = param.to_local()
        full = full.to(device=local.device, dtype=local.dtype)
        # src_data_rank=None: every rank has the same full value, so each slices its own part.
        local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
    else:
        param.copy_(full)
