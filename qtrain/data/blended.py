"""Blending several GPT datasets by weight, and building the train/valid/test datasets.

Mirrors megatron-core 0.16.1's ``BlendedMegatronDatasetBuilder`` and ``BlendedDataset``:

* ``--data-path A`` builds a plain :class:`GPTDataset` per split;
* ``--data-path 0.3 A 0.7 B`` (weights given, even for a single prefix) builds, per split, one
  GPTDataset per prefix asking for ``ceil(ceil(size * w) * 1.005)`` samples (0.5% surplus) and a
  :class:`BlendedDataset` of ``sum(ceil(size * w))`` samples that picks, for each sample, the
  dataset whose share lags its weight the most (ties to the lower index);
* ``--data-path A B`` (no weights) blends in proportion to the datasets' lengths.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import torch

from qtrain.data.gpt_dataset import SPLIT_NAMES, GPTDataset, GPTDatasetConfig, default_cache_dir, split_ranges
from qtrain.data.index_cache import IndexCache
from qtrain.data.indexed import IndexedDataset
from qtrain.errors import ConfigError, DataError, QtrainError

logger = logging.getLogger(__name__)


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_path(data_path: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """``--data-path`` -> (prefixes, weights or None).

    Either prefixes only (``A B``) or weight/prefix pairs (``0.3 A 0.7 B``); a string is split on
    whitespace. Weights must be positive numbers.
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x).strip() for x in data_path]
    items = [x for x in items if x]
    if not items:
        raise ConfigError("--data-path is empty: give a dataset prefix or weight/prefix pairs")
    numeric = [_as_float(x) is not None for x in items]
    if not any(numeric):
        return items, None
    pairs_ok = len(items) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    if not pairs_ok:
        raise ConfigError(
            f"--data-path {' '.join(items)!r} is malformed: give prefixes only (A B) or "
            "weight/prefix pairs (0.3 A 0.7 B), each weight followed by its prefix"
        )
    weights = [float(x) for x in items[0::2]]
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(f"--data-path weights must be positive numbers, got {weights}")
    return items[1::2], weights


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, with megatron-core's float64 arithmetic."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` samples, the dataset to draw from and that dataset's sample number.

    Greedy: pick the dataset whose ``weight * max(i, 1) - drawn`` is largest (first on ties),
    exactly as Megatron's C++ ``build_blending_indices``.
    """
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        x = float(max(i, 1))
        best, best_err = 0, w[0] * x - counts[0]
        for d in range(1, len(w)):
            err = w[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def build_exhaustive_blending_indices(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`build_blending_indices`, drawing exactly ``sizes[d]`` samples from dataset ``d``."""
    total = int(sum(sizes))
    w = [s / float(total) for s in sizes]
    counts = [0] * len(sizes)
    unspent = [d for d in range(len(sizes)) if sizes[d] > 0]
    dataset_index = np.zeros(total, dtype=np.int16)
    dataset_sample_index = np.zeros(total, dtype=np.int64)
    for i in range(total):
        x = float(max(i, 1))
        best, best_err = -1, -math.inf
        for d in unspent:
            err = w[d] * x - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """Samples drawn from several GPT datasets by weight; items carry ``dataset_id``."""

    def __init__(
        self,
        datasets: list[GPTDataset],
        weights: Sequence[float],
        size: int | None,
        config: GPTDatasetConfig,
        write_cache: bool = True,
    ) -> None:
        self.datasets = datasets
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        self.size = size
        fields = {
            "class": "BlendedDataset",
            "format": 1,
            "datasets": [ds.cache.hash for ds in datasets],
            "weights": self.weights,
            "size": size,
        }
        first = datasets[0].indexed.path_prefix
        cache_dir = default_cache_dir(first) if config.cache_dir is None else (config.cache_dir or None)
        self.cache = IndexCache(cache_dir, "BlendedDataset", fields)
        arrays, self.cache_hit = self.cache.get(
            ["dataset_index", "dataset_sample_index"], self._build, write=write_cache
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _build(self) -> dict[str, np.ndarray]:
        if self.size is None:
            dataset_index, sample_index = build_exhaustive_blending_indices(self.weights)
        else:
            dataset_index, sample_index = build_blending_indices(self.weights, self.size)
        drawn = np.bincount(dataset_index.astype(np.int64), minlength=len(self.datasets))
        for d, (n, ds) in enumerate(zip(drawn, self.datasets)):
            if n > len(ds):
                raise DataError(
                    f"the {ds.split_name} blend draws {n} samples from {ds.indexed.path_prefix} "
                    f"(dataset {d}), which has only {len(ds)}; raise mid_level_dataset_surplus"
                )
        return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

    def __len__(self) -> int:
        return len(self.dataset_index)

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` token ids of blended sample ``idx``."""
        d = int(self.dataset_index[idx])
        return self.datasets[d].sample_tokens(int(self.dataset_sample_index[idx]))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        d = int(self.dataset_index[idx])
        item = self.datasets[d][int(self.dataset_sample_index[idx])]
        item["dataset_id"] = torch.tensor(d)
        return item


def train_valid_test_num_samples(
    train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int
) -> list[int]:
    """Samples each split must provide, as Megatron-LM's training loop asks for them."""
    eval_samples = (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    return [train_iters * global_batch_size, eval_samples, eval_iters * global_batch_size]


def _split_datasets(
    prefix: str, sizes: Sequence[int | None], config: GPTDatasetConfig, write_cache: bool
) -> list[GPTDataset | None]:
    indexed = IndexedDataset(prefix)
    out: list[GPTDataset | None] = []
    for name, bounds, size in zip(SPLIT_NAMES, split_ranges(config.split, len(indexed)), sizes):
        if bounds is None:
            out.append(None)
            continue
        if bounds[0] == bounds[1]:
            # Megatron loops forever here; an empty split is more useful as "no dataset".
            logger.warning(
                "%s: --split %s leaves the %s split without documents (%d in all); it is skipped",
                prefix, config.split, name, len(indexed),
            )
            out.append(None)
            continue
        documents = np.arange(bounds[0], bounds[1], dtype=np.int32)
        out.append(GPTDataset(indexed, documents, size, name, config, write_cache))
    return out


def _build_all(
    prefixes: list[str], weights: list[float] | None, sizes: Sequence[int | None], config: GPTDatasetConfig, write_cache: bool
) -> list[GPTDataset | BlendedDataset | None]:
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            hint = (
                f"drop the extension: --data-path {prefix[:-4]}"
                if prefix.endswith((".bin", ".idx")) and IndexedDataset.exists(prefix[:-4])
                else "give the prefix without .bin/.idx, e.g. data/corpus_text_document, as written by `qtrain preprocess`"
            )
            raise DataError(f"--data-path prefix {prefix!r} not found (missing {', '.join(missing)}); {hint}")
    if len(prefixes) == 1 and weights is None:
        return list(_split_datasets(prefixes[0], sizes, config, write_cache))
    if weights is not None:
        if any(s is None for s in sizes):
            raise ConfigError("blending by weights needs a number of samples for every split")
        w = normalize(weights)
        targets = [[int(math.ceil(s * wi)) for s in sizes] for wi in w]
        buffers = [[int(math.ceil(math.ceil(s * wi) * (1 + config.mid_level_dataset_surplus))) for s in sizes] for wi in w]
    else:
        buffers = [[None] * len(SPLIT_NAMES) for _ in prefixes]
    per_prefix = [_split_datasets(p, b, config, write_cache) for p, b in zip(prefixes, buffers)]
    out: list[GPTDataset | BlendedDataset | None] = []
    for i in range(len(SPLIT_NAMES)):
        parts = [ds[i] for ds in per_prefix]
        if any(p is None for p in parts):
            out.append(None)  # the split is off, or empty in some dataset (warned above)
            continue
        if weights is not None:
            out.append(BlendedDataset(parts, w, sum(t[i] for t in targets), config, write_cache))
        else:
            lengths = [len(p) for p in parts]
            size = None if sizes[i] is None else min(sizes[i], sum(lengths))
            out.append(BlendedDataset(parts, lengths, size, config, write_cache))
    return out


def build_gpt_datasets(
    data_path: str | Sequence[str], sizes: Sequence[int | None], config: GPTDatasetConfig
) -> list[GPTDataset | BlendedDataset | None]:
    """The [train, valid, test] datasets of ``--data-path``.

    A split is None when ``--split`` gives it no weight, or (with a warning) when it holds no
    document in some dataset.

    ``sizes`` are the samples each split must provide (see :func:`train_valid_test_num_samples`;
    None: one epoch, only without weights). Under torch.distributed this must be called on every
    rank: rank 0 builds and caches the indices first, the other ranks then load them.
    """
    prefixes, weights = parse_data_path(data_path)
    if len(sizes) != len(SPLIT_NAMES):
        raise ConfigError(f"sizes must give train, valid and test sample counts, got {list(sizes)}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return _build_all(prefixes, weights, sizes, config, write_cache=True)
    # Rank 0 builds and caches; its outcome (None or the error) is broadcast so that the other
    # ranks load the cache, or fail with the same message instead of waiting forever.
    rank = torch.distributed.get_rank()
    result, outcome = None, [None]
    if rank == 0:
        try:
            result = _build_all(prefixes, weights, sizes, config, write_cache=True)
        except (QtrainError, OSError) as e:
            outcome = [f"{type(e).__name__}: {e}"]
            torch.distributed.broadcast_object_list(outcome, src=0)
            raise
    torch.distributed.broadcast_object_list(outcome, src=0)
    if rank != 0:
        if outcome[0] is not None:
            raise DataError(f"rank 0 failed to build the datasets: {outcome[0]}")
        result = _build_all(prefixes, weights, sizes, config, write_cache=False)
    return result


def no_training_data(data_path: str | Sequence[str], split: str) -> str:
    """Why `--data-path` / `--split` leave the train split without documents (an error message)."""
    from qtrain.data.gpt_dataset import parse_split

    if parse_split(split)[0] == 0:
        return f"--split {split} gives the train part no weight; give it one, e.g. --split 98,2,0"
    prefixes, _ = parse_data_path(data_path)
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            continue  # an instruction dataset: its own builder names its files
        docs = len(IndexedDataset(prefix).document_indices) - 1
        if docs == 0:
            return (f"--data-path {prefix}: the dataset holds no documents; preprocess a non-empty corpus "
                    f"(`qtrain preprocess` stops on an empty input)")
        train = split_ranges(split, docs)[0]
        if train is None or train[0] == train[1]:
            return (f"--data-path {prefix}: its train split (--split {split}) of {docs} document(s) holds none; "
                    f"add documents or give the train part more weight")
    return (f"--data-path {' '.join(map(str, prefixes))}: no training samples with --split {split}; "
            f"check that the dataset holds documents and that the train part has a weight")
