"""Learning-rate schedules with Megatron's exact formulas (OptimizerParamScheduler).

Megatron counts schedule steps in samples: after iteration i the scheduler has seen
i * global_batch_size samples, and the optimizer step of iteration i (1-based) uses the LR at
(i - 1) * global_batch_size samples. So with warmup the first iteration trains at
--lr-warmup-init (0 by default), exactly like Megatron.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from qtrain.errors import ConfigError


@dataclass
class LRSchedule:
    """Megatron's LR curve as a pure function of the number of samples consumed."""

    max_lr: float
    min_lr: float
    warmup_steps: float          # samples (may be fractional with --lr-warmup-fraction)
    decay_steps: int             # samples
    style: str                   # constant | linear | cosine | WSD
    init_lr: float = 0.0
    wsd_decay_steps: Optional[int] = None
    wsd_style: str = "exponential"

    def lr_at(self, num_steps: float) -> float:
        """LR after `num_steps` samples (Megatron's get_lr)."""
        if self.warmup_steps > 0 and num_steps <= self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * float(num_steps) / float(self.warmup_steps)
        if self.style == "constant":
            return self.max_lr
        if num_steps > self.decay_steps:
            return self.min_lr
        ratio = float(num_steps - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        elif self.style == "WSD":
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if num_steps <= anneal_start:
                coeff = 1.0
            else:
                r = float(num_steps - anneal_start) / float(self.wsd_decay_steps)
                coeff = {
                    "linear": lambda: 1.0 - r,
                    "cosine": lambda: 0.5 * (math.cos(math.pi * r) + 1.0),
                    "exponential": lambda: 2.0 * math.pow(0.5, r) - 1.0,
                    "minus_sqrt": lambda: 1.0 - math.sqrt(r),
                }[self.wsd_style]()
        else:
            raise ConfigError(f"--lr-decay-style {self.style!r} is not one of constant, linear, cosine, WSD")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def lr_for_iteration(self, iteration: int, global_batch_size: int) -> float:
        """LR used by the optimizer step of `iteration` (1-based)."""
        return self.lr_at((iteration - 1) * global_batch_size)


def build_schedule(optim_args, train_iters: int, global_batch_size: int) -> LRSchedule:
    """Megatron's translation of the --lr-* flags into sample counts."""
    decay_iters = optim_args.lr_decay_iters if optim_args.lr_decay_iters is not None else train_iters
    decay_steps = decay_iters * global_batch_size
    if optim_args.lr_warmup_fraction is not None:
        warmup_steps = optim_args.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = optim_args.lr_warmup_iters * global_batch_size
    if decay_steps <= 0 or warmup_steps >= decay_steps:
        raise ConfigError(f"LR warmup ({warmup_steps / global_batch_size:g} iterations) must be shorter than "
                          f"--lr-decay-iters ({decay_iters}); lower --lr-warmup-iters/--lr-warmup-fraction")
    wsd = None
    if optim_args.lr_decay_style == "WSD":
        wsd = optim_args.lr_wsd_decay_iters * global_batch_size
    return LRSchedule(max_lr=optim_args.lr, min_lr=optim_args.min_lr, warmup_steps=warmup_steps,
                      decay_steps=decay_steps, style=optim_args.lr_decay_style, init_lr=optim_args.lr_warmup_init,
                      wsd_decay_steps=wsd, wsd_style=optim_args.lr_wsd_decay_style)
