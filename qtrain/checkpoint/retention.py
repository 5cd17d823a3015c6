"""Which older checkpoints a run deletes: `--keep-last-checkpoints N` (the newest N) and Megatron's
`--save-retain-interval N` (iterations divisible by N). Called by rank 0 only after a new
checkpoint is complete and the tracker names it; the checkpoint the tracker names is never deleted,
nor any iteration above the one just saved (another run's, e.g. a resume from an earlier point).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from qtrain.checkpoint.layout import read_tracker

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoints_to_delete(iterations: list[int], latest: int, keep_last: Optional[int],
                          retain_interval: Optional[int]) -> list[int]:
    """The iterations (of complete checkpoints up to `latest`) that the rules let go."""
    if not keep_last and not retain_interval:
        return []
    older = sorted(i for i in iterations if i <= latest)
    keep = {latest}
    if keep_last:
        keep.update(older[-keep_last:])
    if retain_interval:
        keep.update(i for i in older if i % retain_interval == 0)
    return [i for i in older if i not in keep]


def prune_checkpoints(save_dir: str | Path, keep_last: Optional[int], retain_interval: Optional[int]) -> list[Path]:
    """Delete what `checkpoints_to_delete` names; each folder is renamed away first, so an
    interrupted deletion never leaves a half-deleted `iter_XXXXXXX/`. Returns the deleted folders."""
    save_dir = Path(save_dir)
    latest = read_tracker(save_dir, missing_ok=True)
    if not isinstance(latest, int):
        return []
    found = [int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))]
    deleted = []
    for it in checkpoints_to_delete(found, latest, keep_last, retain_interval):
        folder = save_dir / f"iter_{it:07d}"
        doomed = folder.with_name(folder.name + ".old")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        shutil.rmtree(doomed)
        deleted.append(folder)
    return deleted
