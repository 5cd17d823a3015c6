"""Tiny inputs for the bad-input and malicious-checkpoint tests: a model dir, a dataset, a
checkpoint, and how to run a command the way a user does (qtrain.cli: one line, exit status)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from qtrain import cli

VOCAB = 256
POSITIONS = 64


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `qtrain <argv>`, in this process."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc: int, err: str, command: str, *needles: str, code: int = 1) -> str:
    """The command failed with `code` and said so in one line naming `needles`, without a traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines()
              if line.startswith(tuple(f"qtrain {command}: {w}" for w in ("error:", "interrupted", "stopped")))]
    assert rc == code and len(errors) == 1, (rc, err)
    assert err.rstrip().splitlines()[-1] == errors[0], err  # the last thing said
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def tiny_model(vocab: int = VOCAB, positions: int = POSITIONS, seed: int = 0):
    from qtrain.models.config import Qwen3Config
    from qtrain.models.qwen3 import Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=positions,
                      rope_theta=10000.0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def tiny_hf(path: Path, **kw) -> Path:
    from qtrain.models.hf import save_hf

    save_hf(tiny_model(**kw), path)
    return path


def tiny_dataset(prefix: Path, num_docs: int = 60, high: int = 200, seed: int = 0) -> str:
    """Documents of token ids below `high`."""
    from qtrain.data.indexed import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
    for _ in range(num_docs):
        builder.add_item(rng.randint(0, high, size=rng.randint(20, 80)).astype(np.uint16))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def train_args(data: str, **over) -> list[str]:
    """A 1-layer, 256-vocab Qwen3 on 16-token samples: seconds on one CPU core."""
    opts = {"num-layers": 1, "hidden-size": 32, "ffn-hidden-size": 64, "num-attention-heads": 2,
            "num-query-groups": 1, "group-query-attention": True, "padded-vocab-size": VOCAB,
            "max-position-embeddings": POSITIONS, "seq-length": 16, "micro-batch-size": 2,
            "global-batch-size": 2, "train-iters": 2, "lr": 1e-3, "data-path": data, "split": "100,0,0",
            "log-interval": 1, "eval-iters": 0, "device": "cpu"}
    opts.update({k.replace("_", "-"): v for k, v in over.items()})
    argv: list[str] = []
    for k, v in opts.items():
        if v is None or v is False:
            continue
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


class RunsShell:
    """Unpickling this runs `touch <marker>` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def shell_pickle(marker: Path) -> bytes:
    return pickle.dumps(RunsShell(marker))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))
