"""Process setup for training: torchrun-aware process group, device, the parallel layout,
and the SIGTERM flag (finish the step, save, exit 0).

Every run has a process group and a DeviceMesh, one device included (a world of one, made
in-process without a rendezvous): one device trains through the same FSDP2 / parallelize path
as many, so what runs on one GPU is what runs on a thousand.
"""

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
    owns_world_of_one: bool = False  # init_runtime made a one-rank group that close() ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """End the one-rank group this runtime made (a torchrun group ends in `shutdown`)."""
        if self.owns_world_of_one and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_world_of_one = False


def init_runtime(device_choice: str = "auto", timeout_minutes: int = 10, host_collectives: bool = False) -> Runtime:
    """Join the process group: torchrun's (gloo on CPU, nccl on CUDA, hccl on NPU), one that is
    already initialised, or, for a plain `python` launch, a world of one made in-process.
    `host_collectives`: also gloo for host tensors (--optimizer-cpu-offload's gradient norm)."""
    dev_type = qdevice.device_type() if device_choice == "auto" else device_choice
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = qdevice.local_device(local_rank, dev_type)
    owns = False
    if not dist.is_initialized():
        kwargs = {}
        if world == 1:  # no rendezvous needed: an in-process store
            kwargs = dict(store=dist.HashStore(), rank=0, world_size=1)
            owns = True
        backend = qdevice.dist_backend(dev_type)
        if host_collectives:
            from qtrain.parallel.offload import host_collectives_backend

            backend = host_collectives_backend(backend, dev_type)
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type != "cpu" else None, **kwargs)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


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


def apply_parallelism(model: torch.nn.Module, cfg, rt: Runtime):
    """Lay the model out over the ranks with qtrain.parallel (a one-rank mesh on one device): TP, PP,
    CP, recompute, compile, FSDP2 with bf16 compute, fp32 master weights and fp32 gradient reduction.
    Returns (model, ParallelState). The model may still be on the meta device; it is materialised
    after sharding."""
    from qtrain.parallel import build_mesh, parallelize

    mesh = build_mesh(cfg, rt.world_size, rt.device.type, model.config)
    return parallelize(model, mesh, cfg, device=rt.device)


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
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
