"""Whether a resumed run reads the samples in the order of the run that saved the checkpoint.

Megatron's sample order (GPTDataset's document, sample and shuffle indices) follows from the data,
`--split`, `--seq-length` and `--seed`; a resumed run continues at `consumed_samples` of that
order. Resuming with another value of any of them silently repeats some samples and skips
others, so each checkpoint records them (train_state.json, "data_order") and a resume with
another value stops, naming the option and both values. `--override-data-order` resumes anyway.

The data is compared by content size (.bin/.idx bytes of every dataset, with the blend weights),
not by path: a dataset moved or mounted elsewhere resumes, a re-tokenized one does not.
(`--train-iters` may change as in Megatron, which lengthens a run: it can change the order of
samples past the first epoch, as it does there.)
"""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

from qtrain.errors import ConfigError

OVERRIDE = "--override-data-order"


def _files(prefix: str) -> list[str]:
    """A pretraining dataset's .bin/.idx, or an instruction dataset's `<prefix>_*_document` files."""
    exact = [prefix + ".bin", prefix + ".idx"]
    if all(os.path.isfile(f) for f in exact):
        return exact
    return sorted(glob.glob(glob.escape(prefix) + "_*.bin") + glob.glob(glob.escape(prefix) + "_*.idx"))


def data_order(cfg) -> dict[str, Any]:
    """What fixes the sample order of a run (stored with each checkpoint)."""
    from qtrain.data.blended import parse_data_path

    prefixes, weights = parse_data_path(cfg.data.data_path)
    datasets = [{"prefix": p, "weight": None if weights is None else weights[i],
                 "bytes": [os.path.getsize(f) for f in _files(p)]} for i, p in enumerate(prefixes)]
    return {"seq_length": cfg.data.seq_length, "split": cfg.data.split, "seed": cfg.training.seed,
            "datasets": datasets}


def _describe(datasets: list[dict]) -> str:
    return " ".join((f"{d['weight']:g} " if d.get("weight") is not None else "") + str(d["prefix"]) for d in datasets)


def check_resume(saved: Optional[dict], current: dict, checkpoint: str, override: bool, warn=print) -> None:
    """ConfigError naming the first option whose value differs from the checkpoint's (unless `override`)."""
    if not saved:
        return  # written without a record (tests, convert): nothing to compare
    differ = []
    for key, flag in (("seq_length", "--seq-length"), ("split", "--split"), ("seed", "--seed")):
        if saved.get(key) != current[key]:
            differ.append(f"{flag} {current[key]} (the checkpoint was trained with {flag} {saved.get(key)})")
    same_data = [(d.get("weight"), d.get("bytes")) for d in saved.get("datasets", [])] == \
        [(d["weight"], d["bytes"]) for d in current["datasets"]]
    if not same_data:
        differ.append(f"--data-path {_describe(current['datasets'])} (the checkpoint was trained on "
                      f"{_describe(saved.get('datasets', []))}, whose files have other sizes or weights)")
    if not differ:
        return
    if override:
        warn(f"warning: {OVERRIDE}: resuming {checkpoint} with {'; '.join(differ)}: the sample order changes")
        return
    raise ConfigError(f"{differ[0]}: resuming {checkpoint} with it would change the sample order (some samples "
                      f"repeated, others skipped). Use the checkpoint's value, start a new run from its weights "
                      f"with --finetune, or pass {OVERRIDE} to resume anyway"
                      + (f" ({len(differ) - 1} more option(s) differ)" if len(differ) > 1 else ""))
