"""GPT pretraining samples from a ``.bin/.idx`` dataset, with megatron-core's exact sample order.

Megatron's GPTDataset (megatron-core 0.16.1) is reproduced index for index:

* the split string (``"969,30,1"``) cuts the *sequences* of the indexed dataset into
  train/valid/test ranges ``[round(lo * N), round(hi * N))`` (:func:`split_ranges`);
* the **document index** repeats the split's documents once per epoch and shuffles them with
  ``numpy.random.RandomState(seed)``; the last epoch is shuffled separately when fewer than 80%
  of its samples are needed;
* the **sample index** cuts the concatenated documents into samples of ``seq_length + 1``
  tokens that overlap by one token (sample ``j`` starts at token ``j * seq_length``);
* the **shuffle index** is a permutation of the samples from the same random state;
* the number of epochs is the fewest whose tokens cover ``num_samples * seq_length + 1``.

The three indices are cached on disk, keyed by a hash of everything they depend on.

An item is ``{"input_ids": int64[S], "labels": int64[S], "loss_mask": float32[S]}``:
``labels`` are the next tokens (``labels[t] == input_ids[t + 1]``), set to -100 where
``loss_mask`` is 0 (padding, and end-of-document tokens with ``eod_mask_loss``), so a plain
``cross_entropy(..., ignore_index=-100)`` trains on exactly Megatron's tokens. With
``reset_position_ids`` items add ``position_ids`` int64[S] (0 again after each EOD), with
``reset_attention_mask`` ``cu_seqlens`` int32[S + 1] (the documents, for attention without a mask).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from qtrain.data.index_cache import IndexCache
from qtrain.data.indexed import IndexedDataset, idx_path
from qtrain.errors import ConfigError, DataError
from qtrain.labels import IGNORE_INDEX
from qtrain.ops.document_attention import sample_cu_seqlens

SPLIT_NAMES = ("train", "valid", "test")
PAD_TOKEN_ID = -1  # Megatron's filler for a partial last sample; never a real token id
_FINAL_EPOCH_THRESHOLD = 0.80  # Megatron separates a final epoch used below 80%


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalized weights ``[0.969, 0.03, 0.001]`` (missing entries are 0).

    Accepts 1-3 non-negative numbers separated by commas or slashes, as Megatron's ``--split``.
    """
    parts = [p.strip() for p in re.split(r"[,/]", str(split))]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"--split {split!r} is malformed: give up to three non-negative weights for "
            "train,valid,test separated by commas, e.g. --split 969,30,1 or --split 100,0,0"
        )
    values += [0.0] * (3 - len(values))
    # Same float arithmetic as megatron-core (numpy float64 division, then running sums).
    return (np.array(values, dtype=np.float64) / np.sum(np.array(values, dtype=np.float64))).tolist()


def split_matrix(weights: Sequence[float]) -> list[tuple[float, float] | None]:
    """Normalized split weights -> the ``(lo, hi)`` book-ends of each split, None where empty."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_ranges(split: str, num_sequences: int) -> list[tuple[int, int] | None]:
    """The ``[begin, end)`` sequence range of train/valid/test for a dataset of ``num_sequences``."""
    out: list[tuple[int, int] | None] = []
    for bookend in split_matrix(parse_split(split)):
        if bookend is None:
            out.append(None)
        else:
            out.append((int(round(bookend[0] * float(num_sequences))), int(round(bookend[1] * float(num_sequences)))))
    return out


def num_epochs_for(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """Fewest epochs whose tokens cover ``num_samples`` samples of ``seq_length + 1`` tokens."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_final_epoch: bool
) -> np.ndarray:
    """``documents`` repeated ``num_epochs`` times and shuffled (the last epoch apart if asked)."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents), num_epochs).astype(np.int32)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(
    sizes: np.ndarray, document_index: np.ndarray, seq_length: int, drop_last_partial: bool = True
) -> np.ndarray:
    """Rows ``(position in document_index, token offset)`` where each sample starts; one extra row.

    Sample ``j`` covers tokens ``[j*S, j*S + S + 1)`` of the concatenated documents. Boundary ``j``
    sits in the first document that *contains* token ``j*S`` (empty documents are skipped),
    which is what Megatron's C++ ``build_sample_idx`` computes one token at a time.
    """
    lengths = np.asarray(sizes)[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total <= 1:
        raise DataError("cannot build samples: the split has fewer than 2 tokens")
    if drop_last_partial:
        num_samples = (total - 1) // seq_length
    else:  # C++ computes this in single precision; keep its rounding
        num_samples = int(math.ceil(np.float32(np.float32(total - 1) / np.float32(seq_length))))
    big = max(len(document_index), int(np.max(sizes))) > np.iinfo(np.int32).max
    index = np.zeros((num_samples + 1, 2), dtype=np.int64 if big else np.int32)
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    docs = np.searchsorted(ends, positions, side="right")
    past_end = docs >= len(ends)  # only the partial last sample when drop_last_partial is False
    docs[past_end] = len(ends) - 1
    offsets = positions - (ends[docs] - lengths[docs])
    offsets[past_end] = lengths[-1] - 1
    index[1:, 0] = docs
    index[1:, 1] = offsets
    return index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` followed by one of ``[num_samples, total_size)``."""
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


@dataclass(frozen=True)
class GPTDatasetConfig:
    """What a GPT dataset's sample order depends on (plus how items are shaped)."""

    seq_length: int
    """Tokens per training sample (the model sees ``seq_length`` inputs and as many labels)."""
    seed: int = 1234
    """Seed of the document and sample shuffles (Megatron's ``--seed``)."""
    split: str = "969,30,1"
    """Train/valid/test weights over the sequences of each dataset (``--split``)."""
    cache_dir: str | None = None
    """Where index caches go (``--data-cache-path``); default ``<data dir>/cache``; None-like "" disables."""
    eod_token_id: int | None = None
    """End-of-document token id; needed only for ``eod_mask_loss``."""
    eod_mask_loss: bool = False
    """Do not train on predicting the token after an end-of-document token (Megatron ``--eod-mask-loss``)."""
    reset_position_ids: bool = False
    """Positions restart at 0 after each end-of-document token (Megatron ``--reset-position-ids``)."""
    reset_attention_mask: bool = False
    """Attention stays inside each document, split after each end-of-document token (Megatron
    ``--reset-attention-mask``); items carry ``cu_seqlens`` (qtrain.ops.document_attention)."""
    drop_last_partial_validation_sequence: bool = True
    """Drop the last, partial validation sample instead of padding it."""
    mid_level_dataset_surplus: float = 0.005
    """Extra samples built per blended component, as megatron-core (0.5%)."""

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ConfigError(f"--seq-length must be at least 2, got {self.seq_length}")
        if (self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask) and self.eod_token_id is None:
            raise ConfigError("--eod-mask-loss / --reset-position-ids / --reset-attention-mask need the "
                              "end-of-document token id (eod_token_id)")
        parse_split(self.split)


def default_cache_dir(prefix: str) -> str:
    """``<directory of the data>/cache``: the index cache sits next to the data."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


class GPTDataset(torch.utils.data.Dataset):
    """Samples of one split of one indexed dataset, in Megatron's order.

    ``documents`` are the sequence ids of the split; ``num_samples`` the samples wanted (None: one
    epoch). ``write_cache`` False only loads or builds in memory (for ranks other than the builder).
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        documents: np.ndarray,
        num_samples: int | None,
        split_name: str,
        config: GPTDatasetConfig,
        write_cache: bool = True,
    ) -> None:
        self.indexed = indexed
        self.documents = np.asarray(documents, dtype=np.int32)
        self.num_samples = num_samples
        self.split_name = split_name
        self.config = config
        stat = os.stat(idx_path(indexed.path_prefix))
        self.fields = {
            "class": "GPTDataset",
            "format": 1,
            "dataset_path": os.path.abspath(indexed.path_prefix),
            "idx_size": stat.st_size,
            "idx_mtime_ns": stat.st_mtime_ns,
            "documents": [int(self.documents[0]), int(self.documents[-1]) + 1] if len(self.documents) else [0, 0],
            "num_samples": num_samples,
            "split": split_name,
            "seed": config.seed,
            "seq_length": config.seq_length,
            "drop_last_partial": self._drop_last_partial,
        }
        cache_dir = default_cache_dir(indexed.path_prefix) if config.cache_dir is None else (config.cache_dir or None)
        self.cache = IndexCache(cache_dir, "GPTDataset", self.fields)
        arrays, self.cache_hit = self.cache.get(
            ["document_index", "sample_index", "shuffle_index"], self._build_indices, write=write_cache
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    @property
    def _drop_last_partial(self) -> bool:
        return self.split_name != "valid" or self.config.drop_last_partial_validation_sequence

    def _build_indices(self) -> dict[str, np.ndarray]:
        seq = self.config.seq_length
        sizes = self.indexed.sequence_lengths
        tokens_per_epoch = int(np.sum(sizes[self.documents]))
        if tokens_per_epoch <= 1:
            raise DataError(
                f"{self.indexed.path_prefix}: the {self.split_name} split has {len(self.documents)} "
                f"sequences and {tokens_per_epoch} tokens, too few to draw samples from; "
                "change --split or add data"
            )
        num_epochs = num_epochs_for(tokens_per_epoch, self.num_samples, seq)
        separate_final_epoch = False
        if num_epochs > 1:
            samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq
            samples_from_final = self.num_samples - samples_before_final
            samples_per_epoch = (tokens_per_epoch - 1) // seq
            separate_final_epoch = samples_from_final < int(_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.RandomState(self.config.seed)
        document_index = build_document_index(self.documents, num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_index(sizes, document_index, seq, self._drop_last_partial)
        total = sample_index.shape[0] - 1
        shuffle_index = build_shuffle_index(samples_before_final if separate_final_epoch else total, total, rng)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` token ids (int64) of sample ``idx``, padded with -1 if partial."""
        j = int(self.shuffle_index[idx])
        doc_beg, off_beg = (int(v) for v in self.sample_index[j])
        doc_end, off_end = (int(v) for v in self.sample_index[j + 1])
        get, docs = self.indexed.get, self.document_index
        if doc_beg == doc_end:
            parts = [get(int(docs[doc_beg]), off_beg, off_end - off_beg + 1)]
        else:
            parts = [get(int(docs[doc_beg]), off_beg)]
            parts += [get(int(docs[i])) for i in range(doc_beg + 1, doc_end)]
            parts.append(get(int(docs[doc_end]), 0, off_end + 1))
        tokens = np.concatenate(parts).astype(np.int64)
        want = self.config.seq_length + 1
        if len(tokens) < want:
            tokens = np.concatenate([tokens, np.full(want - len(tokens), PAD_TOKEN_ID, dtype=np.int64)])
        return tokens

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return make_item(self.sample_tokens(idx), self.config)


def make_item(tokens: np.ndarray, config: GPTDatasetConfig) -> dict[str, torch.Tensor]:
    """Inputs, next-token labels and loss mask of a ``seq_length + 1`` token sample (Megatron's masking)."""
    text = torch.from_numpy(tokens)
    input_ids, labels = text[:-1].clone(), text[1:].clone()
    loss_mask = torch.ones(len(input_ids), dtype=torch.float32)
    if config.eod_mask_loss:
        loss_mask[input_ids == config.eod_token_id] = 0.0
    loss_mask[labels == PAD_TOKEN_ID] = 0.0
    item = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask}
    if config.reset_position_ids or config.reset_attention_mask:
        # Megatron's _get_ltor_masks_and_position_ids: a document ends with (and includes) its EOD
        starts = torch.zeros(len(input_ids), dtype=torch.bool)
        starts[1:] = input_ids[:-1] == config.eod_token_id
        if config.reset_position_ids:
            index = torch.arange(len(input_ids))
            item["position_ids"] = index - torch.cummax(torch.where(starts, index, 0), 0).values
        if config.reset_attention_mask:
            item["cu_seqlens"] = sample_cu_seqlens(starts)
    input_ids[input_ids == PAD_TOKEN_ID] = 0
    labels[loss_mask == 0] = IGNORE_INDEX
    return item
