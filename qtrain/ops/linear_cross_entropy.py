"""LM head + cross-entropy without materialising the [tokens, vocab] logits, on every layout.

For Qwen3's 151,936-word vocabulary the float32 logits of one 4096-token sequence take 2.3 GiB,
and their log-softmax and gradient as much again each. Here the loss and both gradients
(w.r.t. the hidden states and the head weight) are computed chunk by chunk in the forward
pass, since the loss is a scalar; backward only scales them. The model calls this with its
LM-head weight whatever the layout:

- one device, FSDP, the last pipeline stage (TP = 1): Liger-Kernel's Triton version on CUDA
  when installed (the same chunking, the softmax gradient written over the logits by one
  kernel; see dispatch.py), else the reference chunked path; torch_npu has no fused linear
  cross-entropy, so Ascend runs the reference;
- tensor parallel: the weight is a vocab-sharded DTensor and the hidden states are replicated,
  or sequence-sharded under --sequence-parallel; the reference path runs vocab-parallel on
  the local shards (vocab_parallel_linear_cross_entropy.py) on every device type.

reduction "none" gives each token's loss (the negative log-probability of its label; 0 where the
label is ignored), e.g. for the sequence log-probabilities of preference training: the same
chunked op on every layout (the reference path, also on CUDA: Liger's kernel sums), gradients
recomputed in backward instead of computed in the forward.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from qtrain.labels import IGNORE_INDEX
from qtrain.ops import dispatch
from qtrain.ops.vocab_parallel_linear_cross_entropy import (
    VocabParallelLinearCrossEntropy,
    VocabParallelTokenCrossEntropy,
    chunk_tokens,
    working_bytes,
)


def _liger_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # Positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction, softcap, return_z_loss, accum_dtype); grads accumulate in fp32.
    out = dispatch.liger().LigerFusedLinearCrossEntropyFunction.apply(
        h, weight, y, None, None, ignore_index, 0.0, 0.0, "sum", None, False, torch.float32)
    return out[0].float()


def _liger_working_bytes(tokens: int, vocab: int, hidden: int, bytes_per_el: int) -> float:
    """What Liger's fused linear cross-entropy allocates beyond its inputs and the head gradient:
    its fp32 head-gradient accumulator, the gradient of the hidden states and one chunk of logits
    (in the input dtype, about tokens x hidden elements: Liger's own chunking rule)."""
    inc = -(-vocab // hidden)
    chunk = min(tokens, 1 << max(0, (-(-tokens // inc) - 1).bit_length()))
    return 4 * vocab * hidden + bytes_per_el * tokens * hidden + bytes_per_el * chunk * vocab


def loss_working_bytes(tokens: int, vocab: int, hidden: int, bytes_per_el: int, tp: int = 1,
                       sequence_parallel: bool = False, device_type: str = "cpu") -> tuple[float, str]:
    """(peak bytes, which path) of the loss of `tokens` tokens on one rank, beyond the hidden states
    and the (unsharded, this rank's vocabulary shard of the) head-weight gradient, as
    `linear_cross_entropy` runs it on `device_type` (for `qtrain plan`)."""
    if tp == 1 and dispatch.backend(device_type)["linear_cross_entropy"] == "liger":
        return _liger_working_bytes(tokens, vocab, hidden, bytes_per_el), "Liger fused linear cross-entropy"
    path = f"chunked, {min(tokens, chunk_tokens(vocab // tp))} tokens per chunk"
    return working_bytes(tokens, vocab // tp, hidden, bytes_per_el, sequence_parallel and tp > 1), \
        path + (", vocab-parallel" if tp > 1 else "")


def _vocab_shard(weight: torch.Tensor):
    """(local weight rows, process group or None, first word of the shard) of a plain weight or a
    DTensor split by vocabulary (Shard(0)) on a 1-D mesh (the TP mesh)."""
    if not isinstance(weight, DTensor):
        return weight, None, 0
    mesh, placements = weight.device_mesh, weight.placements
    if all(p.is_replicate() for p in placements):
        return weight.to_local(), None, 0
    if mesh.ndim != 1 or not placements[0].is_shard(0):
        raise ValueError(f"linear_cross_entropy: the LM-head weight must be split by vocabulary (Shard(0)) over "
                         f"one mesh dimension, got {placements} on a {mesh.ndim}-D mesh")
    local = weight.to_local()
    return local, mesh.get_group(), mesh.get_local_rank() * local.shape[0]


def _tokens(hidden: torch.Tensor, labels: torch.Tensor, ranks: int):
    """(local hidden states [n, H], labels [N] in the order of the gathered hidden states, whether
    the hidden states are sequence-sharded). Sequence-sharded [B, S/TP, H] local blocks are
    gathered rank-major, so the labels [B, S] are reordered to [TP, B, S/TP]."""
    if not isinstance(hidden, DTensor) or all(p.is_replicate() for p in hidden.placements):
        hidden = hidden.to_local() if isinstance(hidden, DTensor) else hidden
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), False
    if hidden.ndim != 3 or not hidden.placements[0].is_shard(1) or hidden.device_mesh.size() != ranks:
        raise ValueError(f"linear_cross_entropy: hidden states must be replicated or split by sequence "
                         f"(Shard(1) of [B, S, H]) over the LM head's group, got {hidden.placements}")
    local = hidden.to_local()
    b, s = labels.shape
    labels = labels.reshape(b, ranks, s // ranks).transpose(0, 1)
    return local.reshape(-1, local.shape[-1]), labels.reshape(-1), True


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) in float32, chunked over tokens.

    hidden [..., H] (a tensor, or a DTensor replicated or split by sequence), weight [V, H] (a
    tensor, or a DTensor split by vocabulary), labels [...] aligned with the whole hidden states.
    reduction "mean" (over non-ignored tokens), "sum", or "none" (per token, labels' shape, 0 on
    ignored labels). chunk_size: tokens per chunk of the reference path (default `chunk_tokens`:
    one chunk's fp32 logits within 512 MiB). Returns a plain tensor, the same on every rank of a
    vocab-parallel group.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    grads = torch.is_grad_enabled()
    need_h, need_w = grads and hidden.requires_grad, grads and weight.requires_grad
    w, group, vocab_start = _vocab_shard(weight)
    ranks = 1 if group is None else torch.distributed.get_world_size(group)
    h, y, seq_sharded = _tokens(hidden, labels, ranks)
    chunk = chunk_size or chunk_tokens(w.shape[0])
    if reduction == "none":
        return VocabParallelTokenCrossEntropy.apply(h, w, y, group, vocab_start, seq_sharded, ignore_index, chunk,
                                                    tuple(labels.shape))
    if group is None and dispatch.impl("linear_cross_entropy", h.device) == "liger" and h.dtype == w.dtype:
        loss_sum = _liger_loss_sum(h, w, y, ignore_index)
    else:
        loss_sum = VocabParallelLinearCrossEntropy.apply(h, w, y, group, vocab_start, seq_sharded, ignore_index,
                                                         chunk, need_h, need_w)
    if reduction == "sum":
        return loss_sum
    return loss_sum / (y != ignore_index).sum().clamp(min=1)
