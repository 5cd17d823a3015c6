"""RoPE settings of an HF config.json in both spellings: transformers 4's top-level `rope_theta` +
`rope_scaling` (what Qwen3's releases use) and transformers 5's `rope_parameters` (`rope_type`,
`rope_theta` and the scaling keys in one dict).

transformers 5 takes `rope_scaling` over `rope_parameters`, and the `rope_theta` inside the dict
over the top-level one; a config whose spellings disagree is refused rather than guessed at.
"""

from __future__ import annotations

from typing import Any

from qtrain.errors import ConfigError

SPELLINGS = ("rope_scaling", "rope_parameters")
DEFAULT_THETA = 10000.0  # transformers' value when a config gives no rope_theta

# rope_type -> the keys of its dict that qtrain implements.
_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
}


def _rope_type(rope: dict[str, Any], where: str) -> str:
    new, old = rope.get("rope_type"), rope.get("type")
    if new is not None and old is not None and new != old:
        raise ConfigError(f"{where}: rope_type {new!r} and type {old!r} disagree")
    return new if new is not None else (old if old is not None else "default")


def read_hf_rope(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) of an HF config dict; scaling is None for plain RoPE.

    Every rope type or key qtrain does not implement is refused by name.
    """
    dicts = {}
    for name in SPELLINGS:
        value = d.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be an object or null, got {value!r}")
        if value:
            dicts[name] = value
    thetas = {f"{name}.rope_theta": r["rope_theta"] for name, r in dicts.items() if r.get("rope_theta") is not None}
    if d.get("rope_theta") is not None:
        thetas["rope_theta"] = d["rope_theta"]
    if len({float(v) for v in thetas.values()}) > 1:
        raise ConfigError(f"{source}: the RoPE base is given twice with different values "
                          f"({', '.join(f'{k}={v}' for k, v in thetas.items())}); keep one")
    theta = float(next(iter(thetas.values()))) if thetas else DEFAULT_THETA
    parsed = {name: _parse(rope, f"{source}: {name}") for name, rope in dicts.items()}
    if len(parsed) == 2 and parsed["rope_scaling"] != parsed["rope_parameters"]:
        raise ConfigError(f"{source}: rope_scaling {dicts['rope_scaling']} and rope_parameters "
                          f"{dicts['rope_parameters']} describe different RoPE; keep one")
    scaling = next(iter(parsed.values())) if parsed else None
    return theta, scaling


def _parse(rope: dict[str, Any], where: str) -> dict[str, Any] | None:
    """One spelling's dict -> qtrain's scaling dict (None for plain RoPE), refusing what is not implemented."""
    rope_type = _rope_type(rope, where)
    if rope_type not in _KEYS:
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (qtrain implements plain RoPE "
                          f"only); remove it or use a model without RoPE scaling")
    unknown = sorted(set(rope) - _KEYS[rope_type])
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} not supported with rope_type {rope_type!r} "
                          f"(qtrain reads {', '.join(sorted(_KEYS[rope_type]))})")
    if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported "
                          f"(qtrain rotates the whole head)")
    return None


def read_megatron_rope(args: Any, source: str) -> dict[str, Any] | None:
    """The scaling of a Megatron-LM / MindSpeed-LLM checkpoint's `args` (None for plain RoPE).

    Every RoPE variant those args can select and qtrain does not implement is refused by name.
    """
    def arg(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    refused = {
        "rope_scaling_type": arg("rope_scaling_type"),  # MindSpeed-LLM: llama3, yarn, longrope
        "use_rope_scaling": arg("use_rope_scaling", False),  # Megatron-LM: Llama-3.x scaling
        "rotary_seq_len_interpolation_factor": arg("rotary_seq_len_interpolation_factor"),  # linear
        "dynamic_factor": arg("dynamic_factor", 1.0) > 1 or None,  # MindSpeed-LLM: dynamic NTK
        "rotary_percent": arg("rotary_percent", 1.0) != 1.0 or None,  # partial RoPE
        "rotary_interleaved": arg("rotary_interleaved", False),  # GPT-J style pairs
    }
    for name, value in refused.items():
        if value:
            raise ConfigError(f"{source}: checkpoint args set {name}={getattr(args, name)!r}: not supported "
                              f"(qtrain implements plain RoPE only)")
    return None
