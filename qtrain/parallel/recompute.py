"""Activation recomputation (Megatron's --recompute-* flags) with torch.utils.checkpoint.

- full + uniform: every decoder layer keeps only its input and recomputes its inside in the
  backward. (Megatron recomputes groups of --recompute-num-layers layers from the group's input;
  qtrain checkpoints each layer, which recomputes the same work and stores one [B, S, H]
  input per layer instead of one per group.)
- full + block: the first --recompute-num-layers layers of each pipeline stage (or virtual
  chunk) are checkpointed, the rest keep their activations, trading memory for speed.
- selective: every layer saves its matmul and attention outputs and recomputes the cheap
  element-wise ops (norms, RoPE, SwiGLU, casts), the bulk of the activation bytes.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Ops whose outputs selective recompute keeps: the expensive ones.
_SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ARG001 (signature fixed by torch)
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap(layer: nn.Module, selective: bool) -> nn.Module:
    if selective:
        return checkpoint_wrapper(layer,
                                  context_fn=partial(create_selective_checkpoint_contexts, _policy))
    return checkpoint_wrapper(layer)  # non-reentrant checkpoint by default


def layers_to_recompute(num_layers: int, granularity: str | None, method: str | None,
                        recompute_num_layers: int | None) -> list[int]:
    """Positions (0-based, within a stage) of the layers that recompute."""
    if granularity is None:
        return []
    if granularity == "full" and method == "block":
        return list(range(min(recompute_num_layers or 0, num_layers)))
    return list(range(num_layers))


def apply_recompute(model: nn.Module, granularity: str | None, method: str | None,
                    recompute_num_layers: int | None) -> None:
    """Wrap the chosen decoder layers of `model` (a model or pipeline chunk) in place.

    The wrapper adds `_checkpoint_wrapped_module.` to parameter names; torch's state-dict
    helpers (and so DCP checkpoints) strip it, keeping HF names.
    """
    layers = model.model.layers
    keys = list(layers.keys())
    for pos in layers_to_recompute(len(keys), granularity, method, recompute_num_layers):
        key = keys[pos]
        layers[key] = _wrap(layers[key], granularity == "selective")
