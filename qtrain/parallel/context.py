"""Context parallelism: each of CP ranks holds 1/CP of every sequence; attention all-gathers K/V.

Load balance (the "zigzag" split): the sequence is cut into 2*CP chunks and rank r keeps chunks
r and 2*CP-1-r, so under the causal mask every rank has the same amount of attention work.
RoPE uses the tokens' global positions (the batch gets `position_ids`), and attention of the
local queries against the gathered keys/values uses a mask built from the same positions.

K/V are gathered with an autograd-aware all-gather whose backward reduce-scatters the key/value
gradients; attention itself is torch's SDPA, so its backward is SDPA's. This runs on any
torch.distributed backend (gloo on CPU, NCCL, HCCL). Its memory is one full-sequence K/V per
layer (Llama 3's all-gather CP) rather than a ring's two chunks.

torch's own `context_parallel` (experimental) does not run on CPU (torch 2.13: "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered"), which is why qtrain carries this portable path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qtrain.errors import ConfigError
from qtrain.ops.attention import override_attention


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions [seq_len / cp] held by CP rank `rank`: chunks rank and 2*cp-1-rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_batch(batch: dict[str, torch.Tensor], cp_group) -> dict[str, torch.Tensor]:
    """This rank's part of a batch of [B, S] tensors (input_ids, labels, ...), plus the global
    `position_ids` of those tokens."""
    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    seq = batch["input_ids"].shape[1]
    if seq % (2 * cp):
        raise ConfigError(f"sequence length {seq} is not divisible by 2 x --context-parallel-size = {2 * cp}")
    pos = zigzag_positions(seq, cp, rank, batch["input_ids"].device)
    out = {k: v.index_select(1, pos) if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == seq else v
           for k, v in batch.items()}
    out["position_ids"] = pos.unsqueeze(0).expand(batch["input_ids"].shape[0], -1)
    return out


class _GatherSeq(torch.autograd.Function):
    """all_gather of [B, H, S_local, D] into [cp, B, H, S_local, D]; backward: reduce-scatter (each
    rank gets the sum over ranks of the gradient of its own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        cp = dist.get_world_size(group)
        out = x.new_empty((cp * x.shape[0], *x.shape[1:]))  # ranks concatenated along dim 0
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view(cp, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad.contiguous().flatten(0, 1), group=ctx.group)
        return mine, None


def _gather_global_order(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, S/cp, D] zigzag-local -> [B, H, S, D] in global sequence order."""
    parts = _GatherSeq.apply(x, group)
    cp, half = parts.shape[0], x.shape[2] // 2
    chunks = [parts[c, :, :, :half] if c < cp else parts[2 * cp - 1 - c, :, :, half:] for c in range(2 * cp)]
    return torch.cat(chunks, dim=2)


class ContextParallelAttention:
    """attention(q, k, v, mask) for zigzag-sharded sequences over `group`."""

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None, docs=None) -> torch.Tensor:
        if mask is not None or docs is not None:
            raise ConfigError("--context-parallel-size > 1 does not support packed documents (attention masks or "
                              "cu_seqlens) yet")
        cp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        k, v = _gather_global_order(k, self.group), _gather_global_order(v, self.group)
        q_pos = zigzag_positions(k.shape[2], cp, rank, q.device)
        causal = torch.arange(k.shape[2], device=q.device)[None, :] <= q_pos[:, None]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)


def apply_context_parallel(model: nn.Module, cp_group) -> None:
    """Route every attention module's attention through ContextParallelAttention while it runs
    (hooks, so recomputation in the backward takes the same path)."""
    from qtrain.models.qwen3 import Qwen3Attention

    fn = ContextParallelAttention(cp_group)
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
