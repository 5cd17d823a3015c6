"""On-disk cache of dataset index arrays, keyed by a hash of what they were built from.

Each entry is ``<cache_dir>/<md5>-<name>-<array>.npy`` plus ``<md5>-<name>-description.json``
(the full description that was hashed). Every file is written to a temporary name and renamed;
the description is renamed last and marks the entry complete, so a crash mid-write leaves a
miss, never a half-written hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np

from qtrain.errors import DataError


def describe(fields: dict) -> tuple[str, str]:
    """The canonical JSON description of ``fields`` and its md5 hex digest."""
    text = json.dumps(fields, indent=4, sort_keys=True)
    return text, hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class IndexCache:
    """Loads or builds-and-saves a named group of arrays for one description."""

    def __init__(self, cache_dir: str | None, name: str, fields: dict) -> None:
        self.cache_dir = cache_dir
        self.description, self.hash = describe(fields)
        self.name = name

    def path(self, array_name: str) -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, f"{self.hash}-{self.name}-{array_name}")

    def load(self, names: list[str]) -> dict[str, np.ndarray] | None:
        """The cached arrays (memory-mapped), or None on a miss or an unreadable entry."""
        if self.cache_dir is None:
            return None
        desc = self.path("description.json")
        try:
            with open(desc, encoding="utf-8") as f:
                if f.read() != self.description:
                    return None
            return {n: np.load(self.path(f"{n}.npy"), mmap_mode="r", allow_pickle=False) for n in names}
        except (OSError, ValueError):
            return None

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays, then the description that marks the entry complete."""
        if self.cache_dir is None:
            return
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            for n, a in arrays.items():
                _atomic_save(self.path(f"{n}.npy"), a)
            _atomic_text(self.path("description.json"), self.description)
        except OSError as e:
            raise DataError(
                f"cannot write dataset index cache in {self.cache_dir}: {e}; "
                "pass a writable directory with --data-cache-path"
            ) from e

    def get(self, names: list[str], build: Callable[[], dict[str, np.ndarray]], write: bool = True) -> tuple[dict[str, np.ndarray], bool]:
        """Load the arrays, or build them (and save them when ``write``). Returns (arrays, was_hit)."""
        cached = self.load(names)
        if cached is not None:
            return cached, True
        arrays = build()
        if write:
            self.save(arrays)
        return arrays, False
