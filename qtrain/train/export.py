"""`--save-hf`: the final weights of a training run as a Hugging Face dir, written by rank 0
(and, with `--save-hf-interval N`, the weights of every N-th iteration in `<save-hf>/iter_XXXXXXX/`).

Without pipeline parallelism the (sharded) weights are gathered to rank 0's CPU; under PP no
rank holds every layer, so rank 0 reads them back from the run's final checkpoint, tensor by
tensor. Both go through the same writer (checkpoint.writers.save_hf_dir), in float32 (the
master weights), with the tokenizer of --tokenizer-name-or-path when given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from qtrain.errors import ConfigError
from qtrain.parallel import ParallelState

# Full HF-named state dict -> the weights to export (e.g. LoRA adapters merged into the base).
ExportTransform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def interval_export_dir(cfg, iteration: int) -> Path:
    """Where `--save-hf-interval` puts the export of `iteration`: `<save-hf>/iter_XXXXXXX/`."""
    from qtrain.checkpoint.layout import iteration_dir_name

    return Path(cfg.checkpoint.save_hf) / iteration_dir_name(iteration)


def export_hf(model: torch.nn.Module, state: ParallelState, model_cfg, cfg, iteration: int,
              transform: Optional[ExportTransform] = None, out: Optional[Path] = None) -> Path:
    """Write `out` (default cfg.checkpoint.save_hf) from the model as it is now (every rank calls
    this); under PP from the complete checkpoint of `iteration` in --save."""
    from qtrain.checkpoint.sources import StateDictSource, open_source

    out = Path(out or cfg.checkpoint.save_hf)
    tokenizer = Path(cfg.data.tokenizer_name_or_path) if cfg.data.tokenizer_name_or_path else None
    if state.pipeline is not None:
        if transform is not None:
            raise ConfigError("--save-hf: this run's export (e.g. merged LoRA) is not available with "
                              "pipeline parallelism")
        if dist.get_rank() == 0:
            source = open_source("qtrain", cfg.checkpoint.save, iteration)
            try:
                source.tokenizer_dir = tokenizer or source.tokenizer_dir
                _write(source, out)
            finally:
                source.close()
        dist.barrier()
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        if transform is not None:
            full = transform(full)
        _write(StateDictSource(model_cfg, full, tokenizer), out)
    dist.barrier()
    return out


def _write(source, out: Path) -> None:
    """The HF dir, tensor by tensor, with progress (a bar on a terminal, lines in a log)."""
    from qtrain.checkpoint.writers import save_hf_dir
    from qtrain.progress import CountedSource, Progress

    with Progress(f"export HF {out}", len(source.names())) as progress:
        save_hf_dir(CountedSource(source, progress), out, torch.float32)
