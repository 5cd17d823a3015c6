"""Data parallel with FSDP2 (`fully_shard`): one unit per decoder layer, then the root.

Per-layer units let FSDP all-gather one layer's weights while the previous one computes, and free
them after use, so a rank holds 1/dp of the weights, gradients and optimizer state plus one
layer unsharded. Weights are kept in fp32 (the optimizer's master copy); with --bf16 FSDP casts
them to bf16 for compute and reduces gradients in fp32. The mesh is (dp_shard x cp) for FSDP, or
(dp_replicate, dp_shard x cp) for HSDP: CP ranks see different tokens of the same samples, so
their gradients are averaged like data-parallel ones.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard


def data_parallel_mesh(mesh):
    """The FSDP mesh of a build_mesh mesh: 1-D (dp_shard x cp) or 2-D HSDP (dp_replicate, dp_shard x cp)."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


def apply_fsdp(roots: Iterable[nn.Module], layers: Iterable[nn.Module], dp_mesh, bf16: bool,
               reshard_after_forward: bool = True, offload_policy: Optional[OffloadPolicy] = None) -> None:
    """fully_shard each decoder layer, then each root (the model, or each pipeline chunk).

    `reshard_after_forward=False` keeps the gathered weights between a micro-batch's forward and
    backward (used with pipelining, where the two are far apart and re-gathering would double
    the traffic). `offload_policy`: CPUOffloadPolicy keeps the shards, gradients and optimizer
    state in host memory (qtrain.parallel.offload).
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    kw = dict(mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
              offload_policy=offload_policy or OffloadPolicy())
    for layer in layers:
        fully_shard(layer, **kw)
    for root in roots:
        fully_shard(root, **kw)
