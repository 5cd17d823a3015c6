"""Ulysses sequence parallelism (MindSpeed's `ulysses_cp_algo`): an all-to-all turns "every head,
1/CP of the tokens" into "1/CP of the heads, every token", attention runs on whole sequences, and
a second all-to-all turns the output back.

The all-to-alls are torch.distributed.nn's, whose backward is the reverse all-to-all. Query and
key/value heads (per tensor-parallel rank) must both be divisible by the Ulysses degree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from qtrain.errors import ConfigError


def check_heads(q_heads: int, kv_heads: int, degree: int) -> None:
    if q_heads % degree or kv_heads % degree:
        raise ConfigError(
            f"--context-parallel-algo ulysses_cp_algo/hybrid_cp_algo: the Ulysses degree {degree} must divide the "
            f"attention heads of each tensor-parallel rank ({q_heads} query, {kv_heads} key/value); use "
            "megatron_cp_algo (ring), a smaller --ulysses-degree-in-cp, or a smaller tensor-parallel size")


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, S_local, D] -> [B, H / U, U * S_local, D]: the tokens of rank j of the group follow
    those of rank j - 1."""
    u = dist.get_world_size(group)
    b, h, s, d = x.shape
    send = x.reshape(b, u, h // u, s, d).transpose(0, 1).contiguous()  # chunk j: the heads rank j gets
    recv = all_to_all_single(torch.empty_like(send), send, group=group)  # chunk j: rank j's tokens
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of seq_to_heads: [B, H / U, U * S_local, D] -> [B, H, S_local, D]."""
    u = dist.get_world_size(group)
    b, hl, s, d = x.shape
    send = x.reshape(b, hl, u, s // u, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j: rank j's tokens
    recv = all_to_all_single(torch.empty_like(send), send, group=group)  # chunk j: heads of rank j
    return recv.transpose(0, 1).reshape(b, u * hl, s // u, d)
