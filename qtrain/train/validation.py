"""Validation during training: the token-weighted loss over --eval-iters global batches of the
validation split, on every layout (the pipeline's eval schedule under PP).

The k-th evaluation of a run reads the k-th block of validation samples, so a resumed run
evaluates the same samples as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qtrain.data.sampler import ResumableLoader
from qtrain.parallel import ParallelState
from qtrain.parallel.batch import BatchPlan
from qtrain.train.step import eval_step


@torch.no_grad()
def validation_loss(model: torch.nn.Module, state: ParallelState, valid_ds, eval_index: int, eval_iters: int,
                    batch: BatchPlan, device: torch.device) -> float:
    """Mean token loss of `eval_iters` global batches, starting at block `eval_index`; every rank
    gets the same value."""
    start = eval_index * eval_iters * batch.global_batch_size
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    loader = ResumableLoader(valid_ds, batch.micro_batch_size, state.dp_rank, state.dp_size, consumed_samples=start,
                             vocab_size=vocab)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for _ in range(eval_iters):
            s, c = eval_step(model, state, [next(loader) for _ in range(batch.num_microbatches)], device)
            total += s
            count += c
    finally:
        model.train()
    both = torch.stack([total, count])
    dist.all_reduce(both, group=state.loss_group)
    return float(both[0] / both[1].clamp(min=1))
