"""Training samples from the instruction datasets written by the Alpaca / ShareGPT handlers.

`--data-path PREFIX` names the three datasets `PREFIX_packed_{input_ids,attention_mask,labels}_document`
(layout in qtrain/data/handlers.py). Each document is one sample (unpacked) or one pack of
samples (`--pack`); an item is

    input_ids     [S]  the tokens, padded to --seq-length with the pad id
    labels        [S]  the *next* token where it is trained (a response token of the same
                       sample), else -100: prompts, padding and every pack boundary never count
    position_ids  [S]  0, 1, ... restarting at each packed sample
    cu_seqlens    [S + 1] int32 (packed datasets only): where each packed sample starts, then S,
                       padded by repeating S (qtrain.ops.document_attention): attention is causal
                       *within* one sample, so packed samples never see each other; the padding
                       tail is one more document, trained on by no label

Packed means `--pack --neat-pack` (the stored mask holds sample ids 1..k and 0 on padding). A plain
`--pack` dataset stores MindSpeed-LLM's all-1 mask, which keeps no sample boundaries: each pack is
read like one unpacked sample and trains as one causal sequence (positions 0..S-1, samples of a pack
see the ones before them), which is how MindSpeed-LLM trains such data without --reset-position-ids.

With `global_batch_size` set (for `--calculate-per-token-loss`), items also carry
    batch_tokens  []   the number of trained labels in the item's whole global batch (samples
                       [k * GBS, (k + 1) * GBS), the ones the data-parallel sampler hands out for step k)

Unpacked samples need no mask: their padding is at the end, where causal attention already
keeps it out of every real token's view. Sample order: the split's documents, reshuffled every
epoch from `seed` (numpy RandomState, as Megatron's indices), repeated to `num_samples`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qtrain.data.gpt_dataset import split_ranges
from qtrain.data.indexed import IndexedDataset
from qtrain.errors import DataError
from qtrain.labels import IGNORE_INDEX
from qtrain.ops.document_attention import sample_cu_seqlens

KEYS = ("input_ids", "attention_mask", "labels")


def dataset_prefixes(prefix: str) -> dict[str, str]:
    """The three dataset prefixes of an instruction data prefix (also accepts one of the three)."""
    for key in KEYS:  # a user may paste one of the file prefixes
        prefix = prefix.removesuffix(f"_packed_{key}_document")
    return {key: f"{prefix}_packed_{key}_document" for key in KEYS}


def checked_prefixes(prefix: str) -> dict[str, str]:
    """`dataset_prefixes`, after checking that the six files exist."""
    prefixes = dataset_prefixes(prefix)
    for p in prefixes.values():
        if not Path(p + ".idx").is_file() or not Path(p + ".bin").is_file():
            raise DataError(
                f"--data-path {prefix}: {p}.bin/.idx not found; make instruction data with `qtrain preprocess "
                "--handler-name AlpacaStyleInstructionHandler` (or SharegptStyleInstructionHandler) and pass "
                "its --output-prefix")
    return prefixes


def trained_positions(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Bool [n]: position i predicts a trained label (the next token is labelled, same sample)."""
    seg = np.asarray(segments)
    out = np.zeros(len(seg), dtype=bool)
    out[:-1] = (np.asarray(labels)[1:] != IGNORE_INDEX) & (seg[1:] == seg[:-1]) & (seg[:-1] != 0)
    return out


def make_sft_item(tokens: np.ndarray, labels: np.ndarray, segments: np.ndarray, seq_length: int, pad_id: int,
                  packed: bool) -> dict[str, torch.Tensor]:
    """One training item (see the module docstring) from a stored document's three arrays;
    `segments` is the stored attention_mask: the sample index 1..k per token, 0 on padding."""
    n = len(tokens)
    ids = np.full(seq_length, pad_id, dtype=np.int64)
    lab = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    seg = np.zeros(seq_length, dtype=np.int64)
    ids[:n], lab[:n], seg[:n] = tokens, labels, segments
    # Next-token labels, kept only where the next token belongs to the same (real) sample.
    shifted = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    shifted[:-1] = np.where(trained_positions(lab, seg)[:-1], lab[1:], IGNORE_INDEX)
    # Positions restart wherever the segment id changes.
    starts = np.concatenate([[True], seg[1:] != seg[:-1]])
    run_start = np.maximum.accumulate(np.where(starts, np.arange(seq_length), 0))
    positions = np.arange(seq_length) - run_start
    item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(shifted),
            "position_ids": torch.from_numpy(positions)}
    if packed:
        item["cu_seqlens"] = sample_cu_seqlens(torch.from_numpy(starts))
    return item


class InstructionDataset(torch.utils.data.Dataset):
    """`num_samples` items over the documents [begin, end) of an instruction data prefix."""

    def __init__(self, prefix: str, seq_length: int, pad_id: int, num_samples: int | None = None,
                 doc_range: tuple[int, int] | None = None, seed: int = 1234, shuffle: bool = True,
                 global_batch_size: int | None = None):
        prefixes = checked_prefixes(prefix)
        self.ds = {k: IndexedDataset(p) for k, p in prefixes.items()}
        lengths = {k: d.sequence_lengths for k, d in self.ds.items()}
        if not (np.array_equal(lengths["input_ids"], lengths["labels"])
                and np.array_equal(lengths["input_ids"], lengths["attention_mask"])):
            raise DataError(f"--data-path {prefix}: input_ids, labels and attention_mask datasets differ in "
                            "length; they come from different preprocess runs -- regenerate them together")
        total = len(self.ds["input_ids"])
        begin, end = doc_range if doc_range is not None else (0, total)
        if end <= begin:
            raise DataError(f"--data-path {prefix}: no samples in the selected split (documents {begin}..{end})")
        longest = int(lengths["input_ids"][begin:end].max())
        if longest > seq_length:
            raise DataError(f"--data-path {prefix}: a sample has {longest} tokens, more than --seq-length "
                            f"{seq_length}; train with the --seq-length used in preprocess (or larger)")
        self.docs = np.arange(begin, end, dtype=np.int64)
        self.seq_length, self.pad_id, self.seed, self.shuffle = seq_length, pad_id, seed, shuffle
        self.num_samples = num_samples if num_samples is not None else len(self.docs)
        first_mask = self.ds["attention_mask"][int(self.docs[0])]
        self.packed = bool(np.any(first_mask != 1))  # packs carry 1..k and padding 0; unpacked is all 1
        self._orders: dict[int, np.ndarray] = {}
        self.global_batch_size = global_batch_size
        self._batch_tokens: dict[int, int] = {}

    def __len__(self) -> int:
        return self.num_samples

    def document(self, idx: int) -> int:
        """The stored document read for sample `idx` (epoch-wise reshuffled)."""
        epoch, pos = divmod(idx, len(self.docs))
        if not self.shuffle:
            return int(self.docs[pos])
        if epoch not in self._orders:
            self._orders[epoch] = np.random.RandomState(self.seed + epoch).permutation(self.docs)
        return int(self._orders[epoch][pos])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(idx)
        doc = self.document(idx)
        item = make_sft_item(self.ds["input_ids"][doc], self.ds["labels"][doc],
                             self.ds["attention_mask"][doc], self.seq_length, self.pad_id, self.packed)
        if self.global_batch_size:
            item["batch_tokens"] = torch.tensor(self.batch_tokens(idx // self.global_batch_size))
        return item

    def batch_tokens(self, step: int) -> int:
        """Trained labels in global batch `step` (cached; reads only labels and masks)."""
        if step not in self._batch_tokens:
            first = step * self.global_batch_size
            docs = [self.document(i) for i in range(first, min(first + self.global_batch_size, self.num_samples))]
            self._batch_tokens[step] = sum(
                int(trained_positions(self.ds["labels"][d], self.ds["attention_mask"][d]).sum()) for d in docs)
        return self._batch_tokens[step]


def build_instruction_datasets(prefix: str, split: str, sizes: list[int], seq_length: int, pad_id: int,
                               seed: int, shuffle: bool = True,
                               global_batch_size: int | None = None) -> list[InstructionDataset | None]:
    """Train / valid / test datasets over the --split ranges of the documents (None for an empty split)."""
    total = len(IndexedDataset(checked_prefixes(prefix)["input_ids"]))
    out: list[InstructionDataset | None] = []
    for i, (bounds, size) in enumerate(zip(split_ranges(split, total), sizes)):
        if bounds is None or bounds[1] <= bounds[0]:
            out.append(None)
        else:
            gbs = global_batch_size if i == 0 else None  # only training steps need the batch count
            out.append(InstructionDataset(prefix, seq_length, pad_id, size, bounds, seed + i, shuffle, gbs))
    return out
