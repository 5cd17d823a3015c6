"""Greedy packing of instruction samples into fixed-length sequences (`--pack`), as MindSpeed-LLM packs.

Samples are first written unpacked (one document each) to temporary datasets; only their lengths are
held in memory. Packs are then filled best-fit, largest sample first -- the greedy knapsack of
LLaMA-Factory / MindSpeed-LLM: start a pack with the longest remaining sample, keep adding the longest
sample that still fits -- into ``seq_length - 1`` tokens, and written out padded to ``seq_length``.
Among samples of equal length the one that came *last* in the input goes first (MindSpeed-LLM pops
from the end of its per-length index lists), so the packs hold MindSpeed-LLM's samples in its order.
The layout of the written packs is described in qtrain/data/instruction_handlers.py.
"""

from __future__ import annotations

import bisect

import numpy as np

from qtrain.data.indexed import IndexedDataset, IndexedDatasetBuilder, bin_path, idx_path
from qtrain.labels import IGNORE_INDEX


def greedy_knapsack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of samples per pack. Every length must be <= capacity. Of equal lengths, the last sample
    in input order is taken first (MindSpeed-LLM's `length2indexes[length].pop()`)."""
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(np.asarray(lengths).tolist()):
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the pack capacity {capacity}")
        buckets.setdefault(n, []).append(i)
    sizes = sorted(buckets)  # distinct lengths still available
    packs = []
    while sizes:
        pack, room = [], capacity
        while True:
            pos = bisect.bisect_right(sizes, room) - 1
            if pos < 0:
                break
            n = sizes[pos]
            pack.append(buckets[n].pop())
            room -= n
            if not buckets[n]:
                del buckets[n], sizes[pos]
        packs.append(pack)
    return packs


def write_packs(
    ids_prefix: str, labels_prefix: str, out_prefixes: dict[str, str], seq_length: int, pad_id: int,
    neat_pack: bool = True,
) -> dict[str, float]:
    """Pack the unpacked datasets at ids_prefix / labels_prefix into the three outputs.

    out_prefixes maps 'input_ids', 'attention_mask', 'labels' to output prefixes. The attention mask
    holds each token's 1-based sample index and 0 on padding (neat_pack, MindSpeed-LLM's --neat-pack),
    else 1 everywhere, padding included (MindSpeed-LLM's plain --pack). Returns stats.
    """
    ids_ds, labels_ds = IndexedDataset(ids_prefix), IndexedDataset(labels_prefix)
    packs = greedy_knapsack(ids_ds.sequence_lengths, seq_length - 1)  # one position always padding
    builders = {k: IndexedDatasetBuilder(bin_path(p), dtype=np.int32) for k, p in out_prefixes.items()}
    try:
        for pack in packs:
            ids = np.full(seq_length, pad_id, dtype=np.int32)
            labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int32)
            mask = np.zeros(seq_length, dtype=np.int32) if neat_pack else np.ones(seq_length, dtype=np.int32)
            pos = 0
            for seg, i in enumerate(pack, start=1):
                sample = ids_ds[i]
                n = len(sample)
                ids[pos : pos + n] = sample
                labels[pos : pos + n] = labels_ds[i]
                mask[pos : pos + n] = seg if neat_pack else 1
                pos += n
            for key, arr in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
                builders[key].add_item(arr)
                builders[key].end_document()
        for key, p in out_prefixes.items():
            builders[key].finalize(idx_path(p))
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    total = int(ids_ds.sequence_lengths.sum())
    return {"samples": len(ids_ds), "packs": len(packs), "fill": total / max(1, len(packs) * seq_length)}
