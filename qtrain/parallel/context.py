"""Context parallelism: each of CP ranks holds 1/CP of every sequence; attention is ring,
Ulysses or both (MindSpeed's `--context-parallel-algo`).

Load balance (the "zigzag" split): the sequence is cut into 2*CP chunks and rank r keeps chunks
r and 2*CP-1-r, so under the causal mask every rank has the same amount of attention work.
RoPE uses the tokens' global positions (the batch gets `position_ids`, or keeps its own
per-document ones, sliced like the tokens); `cu_seqlens` stays whole, since it describes the
global sequence.

  megatron_cp_algo  ring attention (qtrain.parallel.ring_attention): K/V blocks go round the CP
                    group; per rank one block of scores at a time
  ulysses_cp_algo   all-to-all to whole sequences over 1/CP of the heads (qtrain.parallel.ulysses),
                    then plain (or document) attention, and back
  hybrid_cp_algo    Ulysses inside groups of --ulysses-degree-in-cp neighbouring CP ranks, the
                    ring across the groups

Which key a query may see is decided from global positions and documents, so the three share
one description of the sequence, whichever order the tokens sit in on a rank. Runs on any
torch.distributed backend (gloo on CPU, NCCL, HCCL). torch's own `context_parallel`
(experimental) does not run on CPU (torch 2.13: "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered") and knows no documents, which is why qtrain carries this portable path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from qtrain.errors import ConfigError
from qtrain.ops.attention import base_attention, override_attention
from qtrain.ops.document_attention import Documents
from qtrain.parallel.ring_attention import BlockMask, RingAttention
from qtrain.parallel.ulysses import check_heads, heads_to_seq, seq_to_heads

ALGORITHMS = ("megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo")


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions [seq_len / cp] held by CP rank `rank`: chunks rank and 2*cp-1-rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_batch(batch: dict[str, torch.Tensor], cp_group) -> dict[str, torch.Tensor]:
    """This rank's part of a batch of [B, S] tensors (input_ids, labels, position_ids, ...): its
    zigzag chunks; `position_ids` default to the tokens' global positions."""
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    seq = batch["input_ids"].shape[1]
    if seq % (2 * cp):
        raise ConfigError(f"sequence length {seq} is not divisible by 2 x --context-parallel-size = {2 * cp}")
    pos = zigzag_positions(seq, cp, rank, batch["input_ids"].device)
    out = {k: v.index_select(1, pos) if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == seq else v
           for k, v in batch.items()}
    if out.get("position_ids") is None:
        out["position_ids"] = pos.unsqueeze(0).expand(batch["input_ids"].shape[0], -1)
    return out


def document_ids(docs: Documents, positions: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """[B, n]: the document (index into the batch's stream of documents) of each global position."""
    bounds = torch.tensor(docs.bounds[1:], device=positions.device)
    stream = torch.arange(batch, device=positions.device)[:, None] * seq + positions[None]
    return torch.searchsorted(bounds, stream, right=True)


class ContextParallelAttention:
    """attention(q, k, v, mask, docs) for zigzag-sharded sequences. CP rank c is Ulysses rank
    c % U of Ulysses group c // U, and ring rank c // U of ring group c % U (U = the Ulysses degree:
    1 for the ring, CP for Ulysses)."""

    def __init__(self, cp: int, cp_rank: int, ulysses: int, ulysses_group, ring_group) -> None:
        self.cp, self.cp_rank, self.u = cp, cp_rank, ulysses
        self.ulysses_group, self.ring_group = ulysses_group, ring_group

    def positions(self, ring_rank: int, seq: int, device) -> torch.Tensor:
        """Global positions of the tokens a rank of the ring holds (after the Ulysses all-to-all)."""
        return torch.cat([zigzag_positions(seq, self.cp, ring_rank * self.u + j, device) for j in range(self.u)])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, docs: Optional[Documents] = None) -> torch.Tensor:
        if mask is not None:
            raise ConfigError("--context-parallel-size > 1 takes packed documents as cu_seqlens, not a dense mask")
        b, seq = q.shape[0], q.shape[2] * self.cp
        if self.u > 1:
            check_heads(q.shape[1], k.shape[1], self.u)
            q, k, v = (seq_to_heads(x, self.ulysses_group) for x in (q, k, v))
        rings, me = self.cp // self.u, self.cp_rank // self.u
        if rings == 1:  # Ulysses alone: whole sequences, put in global order for plain attention
            pos = self.positions(0, seq, q.device)
            order = torch.argsort(pos)
            out = base_attention(*(x.index_select(2, order) for x in (q, k, v)), None, docs).index_select(2, pos)
        else:
            out = RingAttention.apply(q, k, v, self.ring_group, self._ring_masks(me, rings, b, seq, docs, q.device))
        return heads_to_seq(out, self.ulysses_group) if self.u > 1 else out

    def _ring_masks(self, me: int, rings: int, b: int, seq: int, docs, device) -> list:
        """Per ring step s, the BlockMask of the block of ring rank me - s (None where no local query
        sees any of its keys)."""
        q_pos = self.positions(me, seq, device)
        q_doc = document_ids(docs, q_pos, b, seq) if docs is not None else None
        masks = []
        for step in range(rings):
            kv_pos = self.positions((me - step) % rings, seq, device)
            kv_doc = document_ids(docs, kv_pos, b, seq) if docs is not None else None
            mask = BlockMask(q_pos, kv_pos, q_doc, kv_doc)
            masks.append(None if mask.empty() else mask)
        return masks

def cp_subgroups(mesh, ulysses: int):
    """(Ulysses group, ring group) of this rank. Every rank creates every CP group's subgroups, in
    one order (new_group is collective over the world)."""
    cp_dim = mesh.mesh_dim_names.index("cp")
    rows = mesh.mesh.movedim(cp_dim, -1).reshape(-1, mesh.mesh.shape[cp_dim]).tolist()
    me = dist.get_rank()
    mine = [None, None]
    for row in rows:
        cp = len(row)
        candidates = [row[i * ulysses:(i + 1) * ulysses] for i in range(cp // ulysses)]
        candidates += [row[j::ulysses] for j in range(ulysses)]
        for i, ranks in enumerate(candidates):
            group = dist.new_group(ranks)
            if me in ranks:
                mine[0 if i < cp // ulysses else 1] = group
    return mine[0], mine[1]


def context_parallel_attention(mesh, algorithm: str, ulysses_degree: int) -> ContextParallelAttention:
    """The attention of this rank's CP group for `algorithm` (one of ALGORITHMS)."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--context-parallel-algo {algorithm}: choose one of {', '.join(ALGORITHMS)}")
    cp_group = mesh["cp"].get_group()
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if ulysses_degree in (1, cp):  # one kind only: the CP group itself
        return ContextParallelAttention(cp, rank, ulysses_degree, cp_group, cp_group)
    return ContextParallelAttention(cp, rank, ulysses_degree, *cp_subgroups(mesh, ulysses_degree))


def apply_context_parallel(model: nn.Module, fn: ContextParallelAttention) -> None:
    """Route every attention module's attention through `fn` while it runs (hooks, so
    recomputation in the backward takes the same path)."""
    from qtrain.models.qwen3 import Qwen3Attention

    for module in model.modules():
        if isinstance(module, Qwen3Attention):
            state: dict = {}

            def enter(mod, args, state=state):  # noqa: ARG001
                state["ctx"] = override_attention(fn)
                state["ctx"].__enter__()

            def leave(mod, args, out, state=state):  # noqa: ARG001
                state.pop("ctx").__exit__(None, None, None)

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave, always_call=True)
