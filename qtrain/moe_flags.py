"""MindSpeed-LLM's MoE flags (config.MoeArgs) against the model config: checked, or applied.

With --model-preset or an HF / qtrain --load the model is known: each MoE shape flag given must
agree with it (refused naming both values). Without one (Qwen3 defaults, or a Megatron --load,
whose shape the flags describe as in MindSpeed-LLM's scripts) the flags define the MoE shape.
The load-balancing coefficient, --moe-aux-loss-coeff, is a training setting (config.TrainingArgs,
qtrain/train/moe.py), not checked here.
"""

from __future__ import annotations

import ast
from typing import Any, Optional

from qtrain.errors import ConfigError

# flag, MoeArgs field, HF config key
SHAPE_FLAGS = (("--num-experts", "num_experts", "num_experts"),
               ("--moe-router-topk", "moe_router_topk", "num_experts_per_tok"),
               ("--moe-ffn-hidden-size", "moe_ffn_hidden_size", "moe_intermediate_size"),
               ("--norm-topk-prob", "norm_topk_prob", "norm_topk_prob"))
DISPATCHERS = ("alltoall", "alltoall_seq")


def validate_moe(moe: Any) -> None:
    """Checks that need only the flags."""
    if moe.moe_router_load_balancing_type != "aux_loss":
        raise ConfigError(f"--moe-router-load-balancing-type {moe.moe_router_load_balancing_type}: qtrain implements "
                          f"aux_loss (the Switch-Transformer loss of transformers' Qwen3-MoE) only")
    if moe.moe_token_dispatcher_type not in DISPATCHERS:
        raise ConfigError(f"--moe-token-dispatcher-type {moe.moe_token_dispatcher_type}: qtrain exchanges tokens "
                          f"with an all-to-all over the EP group; use alltoall (or alltoall_seq)")
    if moe.expert_model_parallel_size < 1:
        raise ConfigError(f"--expert-model-parallel-size must be >= 1, got {moe.expert_model_parallel_size}")
    for name, value in (("--num-experts", moe.num_experts), ("--moe-router-topk", moe.moe_router_topk),
                        ("--moe-ffn-hidden-size", moe.moe_ffn_hidden_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    sparse_layers(moe, 1)  # the pattern parses


def sparse_layers(moe: Any, num_layers: int) -> Optional[list[bool]]:
    """Which layers --moe-layer-freq / --first-k-dense-replace make MoE, as MindSpeed-LLM builds them
    (freq N: layer i when i % N == 0, -1 meaning every layer; a list: per layer; first K dense,
    -1 or 0: none); None when neither flag is given."""
    if moe.moe_layer_freq is None and moe.first_k_dense_replace is None:
        return None
    text = moe.moe_layer_freq if moe.moe_layer_freq is not None else "1"
    try:
        freq = ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError):
        freq = None
    if isinstance(freq, int) and freq != 0:
        sparse = [freq == -1 or i % freq == 0 for i in range(num_layers)]
    elif isinstance(freq, list) and all(x in (0, 1) for x in freq):
        sparse = [bool(x) for x in freq]
    else:
        raise ConfigError(f"--moe-layer-freq {text}: expected N (every N-th layer; 1 or -1: every layer) or a "
                          f"per-layer list of 0/1 like [0,1,1,1]")
    first_k = moe.first_k_dense_replace or 0
    if first_k < -1:
        raise ConfigError(f"--first-k-dense-replace must be -1, 0 or a positive layer count, got {first_k}")
    return [s and i >= max(first_k, 0) for i, s in enumerate(sparse)]


def _model_sparse(d: dict[str, Any], num_layers: int) -> list[bool]:
    step = d.get("decoder_sparse_step") or 1
    dense = set(d.get("mlp_only_layers") or [])
    return [bool(d.get("num_experts")) and i not in dense and (i + 1) % step == 0 for i in range(num_layers)]


def apply_moe_flags(moe: Any, d: dict[str, Any], base: Optional[str]) -> None:
    """Check the MoE flags against the HF config dict `d` of the model named by `base` (e.g.
    "--model-preset 30B-A3B"), or, with base None, write them into `d`."""
    layers = d["num_hidden_layers"]
    given = [(flag, key, getattr(moe, field)) for flag, field, key in SHAPE_FLAGS if getattr(moe, field) is not None]
    pattern = sparse_layers(moe, layers)
    if base is None:
        if moe.num_experts:
            d["model_type"], d["architectures"] = "qwen3_moe", ["Qwen3MoeForCausalLM"]
        given.sort(key=lambda g: g[0] != "--num-experts")  # the experts first: the others depend on them
        for _, key, value in given:
            if d.get("num_experts") or key == "num_experts":  # a dense model has no router to renormalise
                d[key] = value
        if pattern is not None and d.get("num_experts"):
            d["decoder_sparse_step"], d["mlp_only_layers"] = 1, [i for i, s in enumerate(pattern) if not s]
    else:
        for flag, key, value in given:
            if key == "norm_topk_prob" and not d.get("num_experts"):
                continue  # a dense model has no router (MindSpeed-LLM's dense Qwen3 scripts pass the flag)
            if key not in d or d[key] != value:
                have = f"{key}={d[key]}" if key in d else "no experts (a dense model)"
                raise ConfigError(f"{flag} {value}: the model of {base} has {have}; drop the flag or make them agree")
        if pattern is not None and d.get("num_experts") and pattern != _model_sparse(d, layers):
            raise ConfigError(
                f"--moe-layer-freq {moe.moe_layer_freq} / --first-k-dense-replace {moe.first_k_dense_replace}: MoE "
                f"layers {[i for i, s in enumerate(pattern) if s]}, but the model of {base} has MoE layers "
                f"{[i for i, s in enumerate(_model_sparse(d, layers)) if s]}")
    if not d.get("num_experts"):
        stray = [flag for flag, field, _ in SHAPE_FLAGS[1:3] if getattr(moe, field) is not None]
        stray += ["--moe-layer-freq / --first-k-dense-replace"] if pattern is not None else []
        stray += ["--expert-model-parallel-size"] if moe.expert_model_parallel_size > 1 else []
        if stray:
            raise ConfigError(f"{', '.join(stray)}: the model has no experts (give --num-experts, or a MoE "
                              f"--model-preset / --load)")
        return
