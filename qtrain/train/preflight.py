"""Before a training run starts: every output location is writable and `--save` is this run's alone.

Rank 0 checks (the output dirs are shared by all ranks) and takes the `--save` lock
(checkpoint/lock.py); every rank then stops with the same message, instead of the others
waiting for rank 0 in a collective. The lock is released when the run ends (`release_outputs`).
"""

from __future__ import annotations

import torch.distributed as dist

from qtrain.checkpoint.lock import DirLock, release_all
from qtrain.errors import ConfigError, QtrainError
from qtrain.io_utils import check_writable_dir


def claim_outputs(cfg, is_main: bool) -> None:
    c, log = cfg.checkpoint, cfg.logging
    error = None
    if is_main:
        try:
            for option, path in (("--save", c.save), ("--save-hf", c.save_hf), ("--log-dir", log.log_dir),
                                 ("--tensorboard-dir", log.tensorboard_dir)):
                if path:
                    check_writable_dir(path, option)
            if c.save:
                DirLock(c.save, "--save").acquire()
        except QtrainError as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[0] is not None:
            raise ConfigError(f"(rank 0) {box[0]}")
    if error is not None:
        raise error


def release_outputs() -> None:
    release_all()
