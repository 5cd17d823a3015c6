"""Helpers of the training tests: tiny synthetic .bin/.idx data, option lists, metrics."""

import json
import socket
from pathlib import Path

import numpy as np


def write_tiny_dataset(prefix: Path, num_docs: int = 120, seed: int = 0) -> str:
    """Documents of an arithmetic token sequence (learnable), vocabulary < 1000."""
    from qtrain.data.indexed import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
    for _ in range(num_docs):
        n, start = rng.randint(20, 120), rng.randint(0, 500)
        builder.add_item(((start + np.arange(n) * 3) % 1000).astype(np.uint16))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def tiny_args(data: str, **over) -> list[str]:
    """A 2-layer, 1024-vocab Qwen3 on 32-token samples: a few iterations take seconds on CPU."""
    opts = {"model-preset": "tiny", "padded-vocab-size": 1024, "num-layers": 2, "seq-length": 32,
            "micro-batch-size": 2, "global-batch-size": 4, "train-iters": 6, "lr": 3e-3,
            "lr-warmup-iters": 2, "lr-decay-style": "cosine", "data-path": data, "split": "90,10,0",
            "eval-interval": 3, "eval-iters": 1, "log-interval": 1}
    opts.update({k.replace("_", "-"): v for k, v in over.items()})
    argv = []
    for k, v in opts.items():
        if v is None:
            continue
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def read_metrics(folder) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_losses(folder) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(folder) if "loss" in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
