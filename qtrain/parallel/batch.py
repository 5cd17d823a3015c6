"""Batch arithmetic: how a global batch splits over data-parallel ranks and micro-batches.

GBS = MBS x DP x micro-batches per step, DP = world / (TP x PP x CP). Every part of qtrain that
needs one of these numbers (the loop, the pipeline schedule, the layout checks, `qtrain sft`'s
per-token loss, `--dry-run`) takes it from `batch_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtrain.errors import ConfigError
from qtrain.parallel.mesh import parallel_dims


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is made: GBS = MBS x DP x accumulation steps."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    num_microbatches: int
    seq_length: int

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


def batch_plan(cfg: Any, world_size: int) -> BatchPlan:
    """The plan of a PretrainConfig on `world_size` ranks; explains what to change when it does not fit."""
    dp = parallel_dims(cfg, world_size).dp
    t = cfg.training
    mbs = t.micro_batch_size
    if mbs is None or mbs < 1:
        raise ConfigError(f"--micro-batch-size must be a positive integer, got {mbs}")
    gbs = t.global_batch_size if t.global_batch_size is not None else mbs * dp
    if gbs < 1 or gbs % (mbs * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp} "
            f"= {mbs * dp}; use a multiple of {mbs * dp} (e.g. {max(1, round(gbs / (mbs * dp))) * mbs * dp})")
    return BatchPlan(mbs, gbs, dp, gbs // (mbs * dp), cfg.data.seq_length)
