"""Preference pairs for `qtrain dpo` from the datasets the pairwise handlers write.

`--data-path PREFIX` names the four datasets `PREFIX_packed_{chosen,rejected}_{input_ids,labels}_document`
(qtrain/data/instruction_handlers.py: one document per record, prompt + answer, labels -100 on the
prompt; a pair the preprocess dropped as too long left empty documents, which are skipped here).
An item is one pair,

    input_ids  [2, S]  the chosen (row 0) and rejected (row 1) sequence, padded to --seq-length
    labels     [2, S]  the *next* token where it is an answer token, else -100 (qtrain sft's rule)
    lengths    [2]     the two sequences' lengths before padding (`--pack-pairs` packs by them)

so a micro-batch of MBS pairs is [MBS, 2, S]; the trainer runs its 2 x MBS sequences through the
model together (qtrain.train.preference.pair_rows). The pairs are not packed: each sequence is one
row with causal attention, so pairs work on every layout (pipeline and context parallel included).
Sample order: the split's pairs, reshuffled every epoch from `seed` as InstructionDataset does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qtrain.data.gpt_dataset import split_ranges
from qtrain.data.indexed import IndexedDataset
from qtrain.data.instruction_dataset import InstructionDataset, make_sft_item
from qtrain.data.instruction_handlers import PAIRWISE_KEYS
from qtrain.errors import DataError


def pairwise_prefixes(prefix: str) -> dict[str, str]:
    """The four dataset prefixes of a pairwise data prefix (also accepts one of the four)."""
    for key in PAIRWISE_KEYS:  # a user may paste one of the file prefixes
        prefix = prefix.removesuffix(f"_packed_{key}_document")
    return {key: f"{prefix}_packed_{key}_document" for key in PAIRWISE_KEYS}


def checked_pairwise_prefixes(prefix: str) -> dict[str, str]:
    """`pairwise_prefixes`, after checking that the eight files exist."""
    prefixes = pairwise_prefixes(prefix)
    for p in prefixes.values():
        if not Path(p + ".idx").is_file() or not Path(p + ".bin").is_file():
            raise DataError(
                f"--data-path {prefix}: {p}.bin/.idx not found; make preference data with `qtrain preprocess "
                "--handler-name AlpacaStylePairwiseHandler` (or SharegptStylePairwiseHandler) and pass its "
                "--output-prefix")
    return prefixes


class PairwiseDataset(torch.utils.data.Dataset):
    """`num_samples` pairs over the documents [begin, end) of a pairwise data prefix."""

    def __init__(self, prefix: str, seq_length: int, pad_id: int, num_samples: int | None = None,
                 doc_range: tuple[int, int] | None = None, seed: int = 1234, shuffle: bool = True):
        self.ds = {k: IndexedDataset(p) for k, p in checked_pairwise_prefixes(prefix).items()}
        lengths = {k: d.sequence_lengths for k, d in self.ds.items()}
        total = len(lengths["chosen_input_ids"])
        if any(len(v) != total for v in lengths.values()) or not (
                np.array_equal(lengths["chosen_input_ids"], lengths["chosen_labels"])
                and np.array_equal(lengths["rejected_input_ids"], lengths["rejected_labels"])):
            raise DataError(f"--data-path {prefix}: the chosen/rejected input_ids and labels datasets differ in "
                            "length; they come from different preprocess runs -- regenerate them together")
        begin, end = doc_range if doc_range is not None else (0, total)
        docs = np.arange(begin, end, dtype=np.int64)
        # Pairs the preprocess dropped (over --seq-length) are empty documents on both sides.
        self.docs = docs[(lengths["chosen_input_ids"][docs] > 0) & (lengths["rejected_input_ids"][docs] > 0)]
        if len(self.docs) == 0:
            raise DataError(f"--data-path {prefix}: no pairs in the selected split (documents {begin}..{end})")
        longest = int(max(lengths["chosen_input_ids"][self.docs].max(), lengths["rejected_input_ids"][self.docs].max()))
        if longest > seq_length:
            raise DataError(f"--data-path {prefix}: a pair has a side of {longest} tokens, more than --seq-length "
                            f"{seq_length}; train with the --seq-length used in preprocess (or larger)")
        self.seq_length, self.pad_id, self.seed, self.shuffle = seq_length, pad_id, seed, shuffle
        self.num_samples = num_samples if num_samples is not None else len(self.docs)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    document = InstructionDataset.document  # the same epoch-wise shuffled order over self.docs

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(idx)
        doc = self.document(idx)
        sides = []
        for side in ("chosen", "rejected"):
            tokens = self.ds[f"{side}_input_ids"][doc]
            sides.append(make_sft_item(tokens, self.ds[f"{side}_labels"][doc], np.ones(len(tokens), dtype=np.int64),
                                       self.seq_length, self.pad_id, packed=False))
        item = {k: torch.stack([s[k] for s in sides]) for k in ("input_ids", "labels")}
        item["lengths"] = torch.tensor([len(self.ds[f"{side}_input_ids"][doc]) for side in ("chosen", "rejected")])
        return item


def build_pairwise_datasets(prefix: str, split: str, sizes: list[int], seq_length: int, pad_id: int, seed: int,
                            shuffle: bool = True) -> list[PairwiseDataset | None]:
    """Train / valid / test datasets over the --split ranges of the pairs (None for an empty split)."""
    total = len(IndexedDataset(checked_pairwise_prefixes(prefix)["chosen_input_ids"]))
    out: list[PairwiseDataset | None] = []
    for i, (bounds, size) in enumerate(zip(split_ranges(split, total), sizes)):
        if bounds is None or bounds[1] <= bounds[0]:
            out.append(None)
        else:
            out.append(PairwiseDataset(prefix, seq_length, pad_id, size, bounds, seed + i, shuffle))
    return out
