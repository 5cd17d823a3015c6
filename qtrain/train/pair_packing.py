"""`qtrain dpo --pack-pairs`: a micro-batch's chosen and rejected sequences packed into as few rows
as fit, each sequence attending only to itself, so short pairs stop paying for `--seq-length` padding.

A micro-batch of MBS pairs ([MBS, 2, S], each sequence padded) has 2 x MBS sequences; their slots
are numbered chosen first (slot = side x MBS + pair), as `qtrain.train.preference.pair_rows`
orders its rows. They are placed first-fit, longest first, into rows of S tokens; each sequence is
a document of its row (positions restart at 0, `cu_seqlens` bounds it: the model's document
attention), and the padding after the last one is a document of its own with no labels. Every
token records its slot, so the per-token log-probabilities sum back to each sequence
(`preference.row_logps`): the pair losses are those of the unpacked rows.
"""

from __future__ import annotations

import torch

from qtrain.labels import IGNORE_INDEX
from qtrain.ops.document_attention import sample_cu_seqlens

Batch = dict[str, torch.Tensor]


def pack_pairs(batch: Batch, pad_id: int = 0) -> tuple[Batch, torch.Tensor]:
    """([R, S] rows: input_ids, labels, position_ids, cu_seqlens [R, S + 1]; slots [R, S], -1 on padding)
    from a micro-batch of pairs with `lengths` [MBS, 2] (qtrain.data.pairwise_dataset)."""
    ids, labels, lengths = batch["input_ids"], batch["labels"], batch["lengths"]
    pairs, _, seq = ids.shape
    slots = [(side, pair) for side in (0, 1) for pair in range(pairs)]
    size = {slot: int(lengths[slot[1], slot[0]]) for slot in slots}
    rows: list[list[tuple[int, int]]] = []
    fill: list[int] = []
    for slot in sorted(slots, key=lambda s: -size[s]):  # stable: equal lengths keep slot order
        row = next((r for r, used in enumerate(fill) if used + size[slot] <= seq), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(slot)
        fill[row] += size[slot]
    out_ids = torch.full((len(rows), seq), pad_id, dtype=ids.dtype)
    out_labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=labels.dtype)
    positions = torch.zeros((len(rows), seq), dtype=torch.long)
    out_slots = torch.full((len(rows), seq), -1, dtype=torch.long)
    starts = torch.zeros((len(rows), seq), dtype=torch.bool)
    for r, placed in enumerate(rows):
        at = 0
        for side, pair in placed:
            n = size[(side, pair)]
            out_ids[r, at:at + n] = ids[pair, side, :n]
            out_labels[r, at:at + n] = labels[pair, side, :n]
            positions[r, at:at + n] = torch.arange(n)
            out_slots[r, at:at + n] = side * pairs + pair
            starts[r, at] = True
            at += n
        if at < seq:
            starts[r, at] = True  # the padding: a document of its own
    cu = torch.stack([sample_cu_seqlens(row) for row in starts])
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": positions, "cu_seqlens": cu}, out_slots
