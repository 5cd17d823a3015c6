"""Weights of a (possibly sharded) model, from outside it: allocation after sharding and an
initialisation that does not depend on the layout.

A model is built on the meta device, laid out by `qtrain.parallel.parallelize`, then
`materialize`d: each rank allocates only its shards, once, and fills them. With a seed, each
parameter's initial value is a function of its HF name and the seed alone (`init_parameters`),
so every layout (one device, FSDP, TP, PP, ...) starts from the same weights.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from qtrain.parallel.full_tensors import copy_full_into

# Wrappers that insert a level into parameter names without changing what the parameter is.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter's HF name with activation-checkpoint / compile wrapper levels removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _initial_value(name: str, shape: torch.Size, std: float, seed: int, device: torch.device) -> torch.Tensor:
    """The full initial value of one parameter: a function of its name, shape and the seed only."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_parameters(model: nn.Module, std: float, seed: int, init_device: torch.device | None = None) -> None:
    """Initialise every parameter of a (possibly sharded, pipelined or wrapped) Qwen3 model as HF
    does (N(0, std) weights, zero biases, unit norms), from a per-parameter seed.

    Each parameter's value depends only on its HF name and `seed`, never on the layout: a tensor-
    or FSDP-sharded parameter (DTensor) keeps the slice of the same full value that one process
    would hold, and a pipeline stage initialises just its own layers. The full value of one
    parameter exists at a time, so memory stays at the shard plus the largest parameter.
    `init_device`: where the values are drawn (default: each parameter's own device), so that
    parameters kept in host memory get the values a device run draws.
    """
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, param in model.named_parameters():
        name = canonical_name(name)
        if tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"  # a last pipeline stage's copy of the tied embedding
        device = init_device or (param.to_local().device if hasattr(param, "to_local") else param.device)
        copy_full_into(param, _initial_value(name, param.shape, std, seed, device))


def materialize(model: nn.Module, device: str | torch.device, dtype: torch.dtype = torch.float32,
                std: float | None = None, seed: int | None = None,
                init_device: torch.device | None = None) -> nn.Module:
    """Allocate a meta-built (possibly sharded) Qwen3ForCausalLM on `device` once and initialise it there
    (or, with `init_device`, draw the values there: see init_parameters).

    With `seed`, the initial weights are the same for every parallel layout (see init_parameters);
    without, they are drawn from torch's global generator (the model's own `init_weights`).
    """
    model.to(dtype)  # on meta this costs nothing, so the one real allocation is already in `dtype`
    model.to_empty(device=device)
    model.tie_weights()
    std = model.config.initializer_range if std is None else std
    if seed is None:
        model.init_weights(std)
    else:
        init_parameters(model, std, seed, init_device)
    return model
