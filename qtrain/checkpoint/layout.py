"""Megatron legacy checkpoint layout: tracker file, iteration folders, per-rank file names.
(How decoder layers are spread over pipeline stages is qtrain.parallel.stages.)

Megatron-LM and MindSpeed-LLM write

    <dir>/latest_checkpointed_iteration.txt          "1" (or "release")
    <dir>/iter_0000001/mp_rank_{tp:02d}/model_optim_rng.pt           when PP == 1
    <dir>/iter_0000001/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  when PP > 1
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qtrain.errors import CheckpointError
from qtrain.io_utils import write_text_atomic

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"


def iteration_dir_name(iteration: int | str) -> str:
    """`iter_0000100` for 100; `release` for the release marker."""
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """The per-rank folder, as Megatron's get_checkpoint_name and MindSpeed-LLM's convert_ckpt_v2
    name it: `mp_rank_TT`, then `_PPP` only when PP > 1, then `_EEE` only when EP > 1."""
    return (f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")
            + (f"_{ep_rank:03d}" if ep_size > 1 else ""))


def read_tracker(ckpt_dir: str | Path, missing_ok: bool = False) -> int | str | None:
    """The iteration named by `latest_checkpointed_iteration.txt`: an int, or "release"; None when
    there is no tracker and `missing_ok` (the one place that reads the file, for every format)."""
    path = Path(ckpt_dir) / TRACKER
    if not path.is_file():
        if missing_ok:
            return None
        raise CheckpointError(
            f"{path}: tracker file not found; {ckpt_dir} is not a Megatron/qtrain checkpoint folder "
            f"(pass the folder that holds {TRACKER}, or name the iteration with --iteration)")
    text = path.read_text().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text!r}") from None


def write_tracker(ckpt_dir: str | Path, iteration: int | str) -> None:
    """Write the tracker file (last, so a half-written checkpoint is never picked up)."""
    write_text_atomic(Path(ckpt_dir) / TRACKER, str(iteration))


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace the iteration folder `final` by the completely written `tmp`; `final` is never
    absent for longer than between two renames."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def resolve_iteration(ckpt_dir: str | Path, iteration: int | None) -> int | str:
    """The explicit iteration if given (its folder must exist), else the tracker's."""
    if iteration is None:
        return read_tracker(ckpt_dir)
    folder = Path(ckpt_dir) / iteration_dir_name(iteration)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such iteration folder (--iteration {iteration})")
    return iteration
