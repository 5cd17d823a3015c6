"""What `qtrain convert` may do to its `--save-dir`: never overwrite silently.

A non-empty `--save-dir` is refused unless `--overwrite` is given. With it, the files a previous
model left there are removed before the new one is written, and nothing else:

- HF: config.json, generation_config.json, model.safetensors / model-XXXXX-of-XXXXX.safetensors and
  the shards the index names, the index, the tokenizer files, qtrain's own temporary files;
- qtrain / Megatron: latest_checkpointed_iteration.txt and the iter_XXXXXXX/ and release/ folders.

config.json (resp. the tracker) goes first, so that a crash in between never leaves a dir that
looks like a complete old model with some of its files missing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from qtrain.checkpoint.layout import TRACKER
from qtrain.checkpoint.lock import LOCK_FILE
from qtrain.errors import ConfigError
from qtrain.models.hf import INDEX_NAME, SINGLE_NAME, TOKENIZER_FILES

_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_ITERATION = re.compile(r"^(iter_\d{7}|release)(\.tmp|\.old)?$")
_HF_FIRST = ("config.json", "generation_config.json", INDEX_NAME)


def model_files(folder: Path) -> list[Path]:
    """The files and folders of a previous model in `folder` (HF, qtrain or Megatron), the ones that
    make it look complete first."""
    names = {p.name for p in folder.iterdir()}
    first = [n for n in _HF_FIRST + (TRACKER,) if n in names]
    listed: set[str] = set()
    if INDEX_NAME in names:
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_text()).get("weight_map", {})
            listed = {str(v) for v in weight_map.values() if "/" not in str(v) and str(v) in names}
        except (ValueError, AttributeError):
            pass
    rest = sorted(n for n in names - set(first) if n == SINGLE_NAME or _SHARD.match(n) or n in listed or
                  n in TOKENIZER_FILES or _ITERATION.match(n) or (n.startswith(".shard-") and n.endswith(".tmp")))
    return [folder / n for n in first + rest]


def prepare_save_dir(save_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty `save_dir` without `overwrite`; with it, remove the previous model's files."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return
    others = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    if not others:
        return
    if not overwrite:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise ConfigError(f"--save-dir {folder}: not empty ({shown}); choose an empty or new dir, or pass "
                          f"--overwrite to replace the model files there (other files are kept)")
    for path in model_files(folder):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_distinct(load_dir: str | Path, save_dir: str | Path) -> None:
    """A conversion never writes into the checkpoint it reads, nor into a dir that holds it (where
    --overwrite would remove its files); a new dir inside it is fine (e.g. `--save-hf ckpt/hf`)."""
    a, b = Path(load_dir).resolve(), Path(save_dir).resolve()
    if a == b or b in a.parents:
        raise ConfigError(f"--save-dir {save_dir}: is --load-dir {load_dir} or holds it; write the conversion to "
                          f"another dir")
