"""qtrain's own training state beside the DCP tensors, as JSON: nothing in it can run code.

    <iter>/train_state.json     iteration, consumed samples, sampler, world size, the options that
                                fix the sample order (see train/resume_check.py); written by rank 0
    <iter>/rng/rank_<r>.json    rank r's random generators: python, numpy, torch CPU, accelerator

Checkpoints of qtrain 0.1.0 before this format pickled both into DCP entries ("train_state",
"rng.rank_<r>"). Unpickling them could run code, so they are not read: such a checkpoint resumes
only as weights (`--finetune`), see `dcp.load_checkpoint`.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtrain.errors import CheckpointError
from qtrain.io_utils import write_json_atomic

FORMAT = 2  # 1: pickled train_state / rng entries in the DCP state dict (refused)
TRAIN_STATE_FILE = "train_state.json"
RNG_DIR = "rng"
LEGACY_KEY = "train_state"  # the DCP entry format 1 wrote


def rng_state() -> dict[str, Any]:
    """Every generator this rank draws from: python, numpy, torch CPU and the accelerator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is not None and acc.type != "cpu":
        state["accelerator"] = (acc.type, getattr(torch, acc.type).get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        kind, s = state["accelerator"]
        getattr(torch, kind).set_rng_state(s)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    version, words, gauss = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    out = {"python": {"version": version, "state": list(words), "gauss_next": gauss},
           "numpy": {"name": name, "key": [int(k) for k in key], "pos": int(pos), "has_gauss": int(has_gauss),
                     "cached_gaussian": float(cached)},
           "torch": _b64(state["torch"])}
    if "accelerator" in state:
        out["accelerator"] = {"type": state["accelerator"][0], "state": _b64(state["accelerator"][1])}
    return out


def rng_from_json(d: dict[str, Any]) -> dict[str, Any]:
    p, n = d["python"], d["numpy"]
    state = {"python": (int(p["version"]), tuple(int(w) for w in p["state"]),
                        None if p["gauss_next"] is None else float(p["gauss_next"])),
             "numpy": (str(n["name"]), np.asarray(n["key"], dtype=np.uint32), int(n["pos"]), int(n["has_gauss"]),
                       float(n["cached_gaussian"])),
             "torch": _tensor(d["torch"])}
    if "accelerator" in d:
        kind = str(d["accelerator"]["type"])
        if kind not in ("cuda", "npu", "xpu", "mps"):
            raise ValueError(f"unknown accelerator type {kind!r}")
        state["accelerator"] = (kind, _tensor(d["accelerator"]["state"]))
    return state


def rng_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / RNG_DIR / f"rank_{rank}.json"


def write_rng(folder: str | Path, rank: int) -> None:
    """This rank's generators into `<folder>/rng/rank_<rank>.json`."""
    write_json_atomic(rng_file(folder, rank), rng_to_json(rng_state()))


def restore_rng(folder: str | Path, rank: int) -> None:
    """Set this rank's generators from the checkpoint; CheckpointError naming the file if malformed."""
    path = rng_file(folder, rank)
    try:
        set_rng_state(rng_from_json(json.loads(path.read_text())))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; resume without it with --no-load-rng") from None
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a valid RNG state ({type(e).__name__}: {e}); "
                              f"resume without it with --no-load-rng") from None


def write_train_state(folder: str | Path, state: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / TRAIN_STATE_FILE, {"format": FORMAT, **state})


def read_train_state(folder: str | Path) -> dict[str, Any]:
    """The train state of a checkpoint; CheckpointError naming the file when it is malformed."""
    path = Path(folder) / TRAIN_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); resume from an earlier checkpoint, or take only "
                              f"the weights with --finetune") from None
    def count(key: str, required: bool) -> bool:
        value = state.get(key)
        return (value is None and not required) or (isinstance(value, int) and value >= 0)

    if not (isinstance(state, dict) and count("iteration", True) and count("world_size", True)
            and count("consumed_samples", False)):
        raise CheckpointError(f"{path}: expected non-negative integers iteration and world_size (and "
                              f"consumed_samples); resume from an earlier checkpoint, or take only the weights "
                              f"with --finetune")
    return state
