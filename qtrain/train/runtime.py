"""Process setup for training: torchrun-aware process group, device, the parallel layout,
and the SIGTERM flag (finish the step, save, exit 0)."""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from qtrain import device as qdevice
from qtrain.errors import Interrupted


@dataclass
class Runtime:
    """Where this process runs: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device_choice: str = "auto", timeout_minutes: int = 10) -> Runtime:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA,
    hccl on NPU); a plain `python` launch is a world of one without a process group."""
    dev_type = qdevice.device_type() if device_choice == "auto" else device_choice
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = qdevice.local_device(local_rank, dev_type)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=qdevice.dist_backend(dev_type),
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type != "cpu" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(rank, dist.get_world_size() if dist.is_initialized() else 1, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_command(name: str, fn: Callable[[], object]) -> int:  # noqa: ARG001  (name: kept for callers)
    """Run a training command (`qtrain pretrain`, `qtrain sft`): exit status 0 on success (also after
    SIGTERM + save); errors propagate to qtrain.cli.run (one line, exit 1); the process group always ends."""
    try:
        fn()
    finally:
        shutdown()
    return 0


@dataclass
class Parallel:
    """The model this rank trains and where it sits in the data-parallel dimension."""

    model: torch.nn.Module
    sharded: bool
    dp_rank: int
    dp_size: int


def apply_parallelism(model: torch.nn.Module, cfg, rt: Runtime) -> Parallel:
    """Lay the (materialised) model out over the ranks with qtrain.parallel: TP, PP, CP, recompute,
    FSDP2 with bf16 params and fp32 gradient reduction. A single rank trains the plain model.

    The model may still be on the meta device; it is materialised after sharding.
    """
    p = cfg.parallel
    if rt.world_size == 1 and (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                               p.context_parallel_size) == (1, 1, 1):
        if p.recompute_granularity:
            from qtrain.parallel.recompute import apply_recompute

            apply_recompute(model, p.recompute_granularity, p.recompute_method, p.recompute_num_layers)
        return Parallel(model, False, 0, 1)
    from qtrain.parallel import build_mesh, parallelize

    mesh = build_mesh(cfg, rt.world_size, rt.device.type, model.config)
    model = parallelize(model, mesh, cfg, device=rt.device)
    return Parallel(model, True, mesh["dp"].get_local_rank(), mesh["dp"].size())


class StopFlag:
    """Set by SIGTERM (a platform stopping the job); the loop checks it after each step,
    saves and returns normally, so the process exits 0. With nothing to save (`immediate`),
    SIGTERM stops the run at once instead (exit 143, see qtrain.cli)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self, immediate: bool = False) -> "StopFlag":
        def handler(signum, frame):  # noqa: ARG001
            if immediate:
                raise Interrupted("stopped by SIGTERM; nothing was saved (no --save)", 128 + signal.SIGTERM)
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. an embedding application): no handler
            self._previous = None
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_rank(self, device: torch.device) -> bool:
        """True when any rank received SIGTERM (one tiny all-reduce per step when distributed,
        so that every rank stops after the same step)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
