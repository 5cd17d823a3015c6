"""What a Qwen3-MoE layer adds to `qtrain plan`'s estimate (parallel/plan.py), per device.

A MoE layer has the dense layer's attention and norms, a router (E x H, replicated) and E experts
of 3 H I_e parameters each (gate, up, down; I_e = moe_intermediate_size), not split over TP.
Expert parallelism (EP) gives each rank of an EP group E / EP experts; EP ranks are carved out of
the data-parallel x CP ranks (as in Megatron), so with FSDP (--use-distributed-optimizer) experts
are sharded over all F = dp_shard x CP ranks either way (EP x expert-FSDP = F) and EP shrinks what
FSDP gathers per layer (E / EP experts instead of E) and the expert gradients reduced; without FSDP
each rank keeps E / EP experts in full.

Per token of a MoE layer, with k routed experts (b: bytes of the compute dtype; the dense MLP's
terms are replaced by these; "| ..." divided by TP under --sequence-parallel, whose tokens are
split over TP; experts see all k copies of each local token, balanced load assumed):

  no recompute  | 8E [router logits in fp32, softmax probabilities] + 12k [top-k weights, indices]
                  + kbH [expert inputs, the permuted (all-to-all received) tokens]
                  + 4kbI_e [gate, up, silu(gate), down's input] + kbH [expert outputs, for the
                  routing weights' gradient in the combine]
  selective     | 8E + 12k + kbH + 2kbI_e [gate, up] + kbH
  full          nothing beyond the dense layer input

With EP > 1 each all-to-all holds its send and receive buffers, k x tokens x bH each, for one
layer at a time (transient).
"""

from __future__ import annotations

import math
from typing import Any

from qtrain.errors import ConfigError


def num_experts(m: Any) -> int:
    return getattr(m, "num_experts", 0) or 0


def is_moe_layer(m: Any, layer: int) -> bool:
    """Qwen3Config.is_sparse_layer; for a transformers config (tests, any object with its fields)
    the same rule: sparse unless in mlp_only_layers, every decoder_sparse_step-th layer."""
    if hasattr(m, "is_sparse_layer"):
        return m.is_sparse_layer(layer)
    return bool(num_experts(m)) and layer not in (getattr(m, "mlp_only_layers", None) or []) and \
        (layer + 1) % (getattr(m, "decoder_sparse_step", 1) or 1) == 0


def router_params(m: Any) -> int:
    return num_experts(m) * m.hidden_size


def expert_params(m: Any) -> int:
    """All experts of one MoE layer."""
    return num_experts(m) * 3 * m.hidden_size * m.moe_intermediate_size


def expert_ways(ep: int, fsdp_ways: int) -> int:
    """Ranks one layer's expert parameters are spread over: EP x expert-FSDP (= F with FSDP)."""
    return ep * fsdp_ways // math.gcd(ep, fsdp_ways)


def mlp_activation_bytes(m: Any, b: int, tp: int = 1, sp: bool = False, mode: str | None = None) -> float:
    """Bytes a MoE layer's router and experts save for the backward, per local token (module doc)."""
    if mode == "full":
        return 0.0
    k, h, i, e = m.num_experts_per_tok, m.hidden_size, m.moe_intermediate_size, num_experts(m)
    experts = k * b * h + (2 if mode == "selective" else 4) * k * b * i + k * b * h
    return (8 * e + 12 * k + experts) / (tp if sp else 1)


def a2a_buffer_bytes(m: Any, tokens: int, b: int, ep: int) -> float:
    """Send + receive buffers of one token all-to-all (dispatch or combine) of one layer."""
    return 0.0 if ep == 1 else 2 * m.num_experts_per_tok * tokens * b * m.hidden_size


def check_ep(m: Any, ep: int, dp: int, cp: int) -> None:
    """EP must divide the experts and the data-parallel x CP ranks it is carved from."""
    if ep < 1:
        raise ConfigError(f"--expert-model-parallel-size must be >= 1, got {ep}")
    if ep == 1:
        return
    if not num_experts(m):
        raise ConfigError(f"--expert-model-parallel-size {ep}: the model is dense (no experts); leave it at 1")
    if num_experts(m) % ep:
        raise ConfigError(f"--expert-model-parallel-size {ep} does not divide the model's {num_experts(m)} experts")
    if (dp * cp) % ep:
        raise ConfigError(f"--expert-model-parallel-size {ep} must divide data-parallel x context-parallel ranks "
                          f"({dp} x {cp}); EP groups are made of those ranks")
