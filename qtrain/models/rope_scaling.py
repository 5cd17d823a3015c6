"""RoPE scaling settings in every spelling qtrain meets, turned into one canonical dict.

- HF config.json: transformers 4's top-level `rope_theta` + `rope_scaling` (what Qwen3's releases
  use) and transformers 5's `rope_parameters` (`rope_type`, `rope_theta` and the scaling keys in
  one dict). transformers 5 takes `rope_scaling` over `rope_parameters` and the dict's `rope_theta`
  over the top-level one; a config whose spellings disagree is refused rather than guessed at.
- Training flags: MindSpeed-LLM's `--rope-scaling-type yarn`, `--rope-scaling-factor`,
  `--rope-scaling-original-max-position-embeddings`, `--beta-fast`, `--beta-slow`,
  `--rope-scaling-mscale`, `--rope-scaling-mscale-all-dim`; Megatron-LM's linear
  `--rotary-seq-len-interpolation-factor`.
- Megatron / MindSpeed-LLM checkpoint `args`: the same names as attributes.

The canonical dict (Qwen3Config.rope_scaling; None for plain RoPE) uses HF's key names:
  {"rope_type": "linear", "factor": f}
  {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": n, [attention_factor,
   beta_fast, beta_slow, mscale, mscale_all_dim, truncate] when given}
qtrain/ops/rope.py computes the frequencies from it exactly as transformers does. Every other
rope type or key is refused by name; `dynamic` too, see REFUSED_TYPES.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from qtrain.errors import ConfigError

SPELLINGS = ("rope_scaling", "rope_parameters")
DEFAULT_THETA = 10000.0  # transformers' value when a config gives no rope_theta

_COMMON = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_YARN_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
# rope_type -> the keys of its dict that qtrain implements.
TYPE_KEYS = {
    "default": _COMMON,
    "linear": _COMMON | {"factor"},
    "yarn": _COMMON | {"factor", "original_max_position_embeddings", *_YARN_OPTIONAL},
}
REFUSED_TYPES = {
    "dynamic": "transformers recomputes dynamic-NTK frequencies from the longest sequence its module has "
               "seen since the last short one (state kept between calls), which no per-batch computation "
               "reproduces; use yarn or linear",
}


def _number(value: Any, where: str, name: str, *, integer: bool = False, minimum: float | None = None) -> Any:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or (minimum is not None and value < minimum) or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: {name} must be {kind}" + (f" >= {minimum}" if minimum is not None else "")
                          + f", got {value!r}")
    return value


def _rope_type(rope: dict[str, Any], where: str) -> str:
    new, old = rope.get("rope_type"), rope.get("type")
    if new is not None and old is not None and new != old:
        raise ConfigError(f"{where}: rope_type {new!r} and type {old!r} disagree")
    return new if new is not None else (old if old is not None else "default")


def canonical(rope: dict[str, Any] | None, max_position_embeddings: int, where: str) -> dict[str, Any] | None:
    """One rope dict (either spelling, or an already canonical one) -> the canonical dict, or None
    for plain RoPE; refuses every type and key qtrain does not implement. As in transformers, a
    yarn dict without original_max_position_embeddings takes max_position_embeddings, and one
    whose factor is null takes max_position_embeddings / original_max_position_embeddings."""
    if not rope:
        return None
    rope_type = _rope_type(rope, where)
    if rope_type not in TYPE_KEYS:
        why = REFUSED_TYPES.get(rope_type, "qtrain implements default, linear and yarn")
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported: {why}")
    unknown = sorted(set(rope) - TYPE_KEYS[rope_type])
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} not supported with rope_type {rope_type!r} "
                          f"(qtrain reads {', '.join(sorted(TYPE_KEYS[rope_type]))})")
    if rope.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported "
                          f"(qtrain rotates the whole head)")
    if rope_type == "default":
        return None
    if rope_type == "linear":
        if rope.get("factor") is None:
            raise ConfigError(f"{where}: rope_type 'linear' needs a factor")
        return {"rope_type": "linear", "factor": float(_number(rope["factor"], where, "factor", minimum=1))}
    if "factor" not in rope:  # transformers refuses it too; null asks for the ratio below
        raise ConfigError(f"{where}: rope_type 'yarn' needs a factor (null: max_position_embeddings / "
                          f"original_max_position_embeddings)")
    original = rope.get("original_max_position_embeddings")
    original = max_position_embeddings if original is None else original
    if isinstance(original, float) and original.is_integer():  # e.g. MindSpeed-LLM's float-typed flag
        original = int(original)
    _number(original, where, "original_max_position_embeddings", integer=True, minimum=1)
    factor = rope.get("factor")
    factor = max_position_embeddings / original if factor is None else factor
    out = {"rope_type": "yarn", "factor": float(_number(factor, where, "factor", minimum=1)),
           "original_max_position_embeddings": original}
    for key in _YARN_OPTIONAL:
        if rope.get(key) is None:
            continue
        if key == "truncate" and not isinstance(rope[key], bool):
            raise ConfigError(f"{where}: truncate must be true or false, got {rope[key]!r}")
        if key != "truncate":
            _number(rope[key], where, key, minimum=0 if key == "attention_factor" else None)
    # Keep only what changes transformers' computation, so equal settings give equal dicts.
    if rope.get("attention_factor") is not None:
        out["attention_factor"] = float(rope["attention_factor"])
    elif rope.get("mscale") and rope.get("mscale_all_dim"):  # transformers reads them only together
        out.update(mscale=rope["mscale"], mscale_all_dim=rope["mscale_all_dim"])
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):  # transformers: `value or default`
        if (rope.get(key) or default) != default:
            out[key] = rope[key]
    if rope.get("truncate") is False:
        out["truncate"] = False
    return out


def read_hf_rope(d: dict[str, Any], source: str, max_position_embeddings: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, canonical scaling or None) of an HF config dict, from either spelling."""
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
    for key, value in thetas.items():
        _number(value, source, key)
    if len({float(v) for v in thetas.values()}) > 1:
        raise ConfigError(f"{source}: the RoPE base is given twice with different values "
                          f"({', '.join(f'{k}={v}' for k, v in thetas.items())}); keep one")
    theta = float(next(iter(thetas.values()))) if thetas else DEFAULT_THETA
    parsed = {name: canonical(rope, max_position_embeddings, f"{source}: {name}") for name, rope in dicts.items()}
    if len(parsed) == 2 and parsed["rope_scaling"] != parsed["rope_parameters"]:
        raise ConfigError(f"{source}: rope_scaling {dicts['rope_scaling']} and rope_parameters "
                          f"{dicts['rope_parameters']} describe different RoPE; keep one")
    scaling = next(iter(parsed.values())) if parsed else None
    explicit = any(r.get("original_max_position_embeddings") is not None for r in dicts.values())
    if scaling and scaling["rope_type"] == "yarn" and explicit:  # else all transformers versions use the factor
        ratio = max_position_embeddings / scaling["original_max_position_embeddings"]
        if ratio != scaling["factor"]:
            warnings.warn(
                f"{source}: yarn factor {scaling['factor']:g} differs from max_position_embeddings / "
                f"original_max_position_embeddings = {ratio:g}; qtrain uses the factor, as transformers 5 and vLLM "
                f"do (transformers 4.51 and MindSpeed-LLM use the ratio); set max_position_embeddings to factor x "
                f"original to make them all agree", stacklevel=3)
    return theta, scaling


def describe(theta: float, scaling: dict[str, Any] | None) -> str:
    """One line for plans and logs, e.g. "RoPE theta 1e+06, yarn x4 from 32768 positions"."""
    text = f"RoPE theta {theta:g}"
    if scaling is None:
        return text
    if scaling["rope_type"] == "linear":
        return f"{text}, linear x{scaling['factor']:g}"
    extra = ", ".join(f"{k} {scaling[k]}" for k in _YARN_OPTIONAL if k in scaling)
    return (f"{text}, yarn x{scaling['factor']:g} from {scaling['original_max_position_embeddings']} positions"
            + (f" ({extra})" if extra else ""))


# ------------------------------------------------------------------ MindSpeed-LLM / Megatron spellings

def _mscale(scale: float, mscale: float) -> float:
    """YaRN's attention-temperature term, as transformers, Megatron-LM and MindSpeed-LLM write it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_from_mindspeed(factor: float, original: int, beta_fast: Any, beta_slow: Any, mscale: Any,
                         mscale_all_dim: Any) -> dict[str, Any]:
    """MindSpeed-LLM's yarn settings -> an HF rope dict. MindSpeed scales cos/sin by
    mscale(factor, --rope-scaling-mscale) / mscale(factor, --rope-scaling-mscale-all-dim) (defaults
    1 and 0); transformers by the same ratio when both are non-zero, else by mscale(factor, 1): the
    defaults agree, and other values that transformers cannot spell become attention_factor."""
    out: dict[str, Any] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                           "beta_fast": beta_fast, "beta_slow": beta_slow}
    ms = 1.0 if mscale is None else mscale
    msa = 0.0 if mscale_all_dim is None else mscale_all_dim
    if ms and msa:
        out.update(mscale=ms, mscale_all_dim=msa)
    elif (ms, msa) != (1.0, 0.0):
        out["attention_factor"] = float(_mscale(factor, ms) / _mscale(factor, msa))
    return out


def rope_from_flags(*, rope_scaling_type: str | None, factor: float | None, original: int | None,
                    beta_fast: float | None, beta_slow: float | None, mscale: float | None,
                    mscale_all_dim: float | None, interpolation_factor: int | None,
                    base: dict[str, Any] | None, max_position_embeddings: int) -> dict[str, Any] | None:
    """The scaling the training flags ask for; `base` (the loaded model's) when they ask for none."""
    yarn_only = {"--rope-scaling-original-max-position-embeddings": original, "--beta-fast": beta_fast,
                 "--beta-slow": beta_slow, "--rope-scaling-mscale": mscale,
                 "--rope-scaling-mscale-all-dim": mscale_all_dim}
    given = [flag for flag, v in yarn_only.items() if v is not None]
    if interpolation_factor is not None:
        if rope_scaling_type is not None:
            raise ConfigError("--rotary-seq-len-interpolation-factor (linear RoPE scaling) and --rope-scaling-type "
                              "both choose the RoPE scaling; give one")
        rope_scaling_type, factor = "linear", interpolation_factor
    if rope_scaling_type is None:
        if given or factor is not None:
            flag = given[0] if given else "--rope-scaling-factor"
            raise ConfigError(f"{flag} needs --rope-scaling-type yarn (MindSpeed-LLM ignores it without one)")
        return base
    if rope_scaling_type == "linear":
        if given:
            raise ConfigError(f"{given[0]} applies to --rope-scaling-type yarn, not linear")
        if factor is None:
            raise ConfigError("--rope-scaling-type linear needs --rope-scaling-factor")
        return canonical({"rope_type": "linear", "factor": factor}, max_position_embeddings, "--rope-scaling-factor")
    if rope_scaling_type != "yarn":
        why = REFUSED_TYPES.get(rope_scaling_type, "qtrain implements yarn and linear")
        raise ConfigError(f"--rope-scaling-type {rope_scaling_type}: not supported: {why}")
    if original is None:
        raise ConfigError("--rope-scaling-type yarn needs --rope-scaling-original-max-position-embeddings "
                          "(the context length the model was pretrained for, e.g. 32768 for Qwen3)")
    factor = max_position_embeddings / original if factor is None else factor
    return canonical(_yarn_from_mindspeed(factor, original, beta_fast, beta_slow, mscale, mscale_all_dim),
                     max_position_embeddings, "RoPE scaling flags")


def megatron_rope_args(scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The `args` entries MindSpeed-LLM (yarn) and Megatron-LM (linear) use for `scaling`.

    MindSpeed-LLM derives a dense model's yarn factor from max_position_embeddings /
    original_max_position_embeddings, so yarn sets max_position_embeddings to factor x original (as
    its yarn scripts pass it). Settings those flags cannot express are refused: the checkpoint
    would describe another model to a job that reads its args.
    """
    if scaling is None:
        return {}
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        if factor != int(factor):
            raise ConfigError(f"RoPE scaling linear x{factor:g}: Megatron's --rotary-seq-len-interpolation-factor "
                              f"takes an integer, so a Megatron checkpoint cannot carry this factor")
        return {"rotary_seq_len_interpolation_factor": int(factor)}
    mscale, mscale_all_dim = scaling.get("mscale", 1.0), scaling.get("mscale_all_dim", 0.0)
    if "attention_factor" in scaling:  # MindSpeed spells it as mscale with mscale_all_dim 0, where that is exact
        mscale = (scaling["attention_factor"] - 1) / (0.1 * math.log(factor)) if factor > 1 else 1.0
        mscale_all_dim = 0.0
        if _mscale(factor, mscale) / _mscale(factor, mscale_all_dim) != scaling["attention_factor"]:
            raise ConfigError(f"RoPE scaling yarn with attention_factor={scaling['attention_factor']!r}: MindSpeed-LLM's "
                              f"--rope-scaling-mscale cannot give it exactly, so a Megatron checkpoint cannot carry "
                              f"this model's RoPE")
    if "truncate" in scaling:
        raise ConfigError(f"RoPE scaling yarn with truncate={scaling['truncate']!r}: MindSpeed-LLM has no flag for it, "
                          f"so a Megatron checkpoint cannot carry this model's RoPE")
    original = scaling["original_max_position_embeddings"]
    max_pos = round(factor * original)
    if max_pos / original != factor:
        raise ConfigError(f"RoPE scaling yarn x{factor:g} from {original}: MindSpeed-LLM derives the factor from an "
                          f"integer max_position_embeddings / {original}, and none gives {factor:g}")
    return {
        "max_position_embeddings": max_pos, "rope_scaling_type": "yarn", "rope_scaling_factor": factor,
        "rope_scaling_original_max_position_embeddings": original,
        "beta_fast": scaling.get("beta_fast", 32), "beta_slow": scaling.get("beta_slow", 1),
        "rope_scaling_mscale": mscale, "rope_scaling_mscale_all_dim": mscale_all_dim,
    }


def read_megatron_rope(args: Any, source: str) -> dict[str, Any] | None:
    """The canonical scaling of a Megatron-LM / MindSpeed-LLM checkpoint's `args` (None for plain RoPE).

    Every RoPE variant those args can select and qtrain does not implement is refused by name.
    """
    def arg(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    refused = {
        "use_rope_scaling": arg("use_rope_scaling", False),  # Megatron-LM: Llama-3.x scaling
        "dynamic_factor": arg("dynamic_factor", 1.0) > 1 or None,  # MindSpeed-LLM: dynamic NTK
        "rotary_percent": arg("rotary_percent", 1.0) != 1.0 or None,  # partial RoPE
        "rotary_interleaved": arg("rotary_interleaved", False),  # GPT-J style pairs
    }
    for name, value in refused.items():
        if value:
            raise ConfigError(f"{source}: checkpoint args set {name}={getattr(args, name)!r}: not supported "
                              f"(qtrain implements plain, linear and yarn RoPE)")
    max_pos = arg("max_position_embeddings")
    rope_type = arg("rope_scaling_type")
    interpolation = arg("rotary_seq_len_interpolation_factor")
    if rope_type is not None and interpolation is not None:
        raise ConfigError(f"{source}: checkpoint args set both rope_scaling_type={rope_type!r} and "
                          f"rotary_seq_len_interpolation_factor={interpolation!r}")
    if interpolation is not None:
        return canonical({"rope_type": "linear", "factor": interpolation}, max_pos or 1,
                         f"{source}: rotary_seq_len_interpolation_factor")
    if rope_type is None:
        return None
    if rope_type != "yarn":
        raise ConfigError(f"{source}: checkpoint args set rope_scaling_type={rope_type!r}: not supported "
                          f"(qtrain implements yarn and linear)")
    original = arg("rope_scaling_original_max_position_embeddings")
    if original is None or max_pos is None:
        raise ConfigError(f"{source}: yarn checkpoint args lack rope_scaling_original_max_position_embeddings "
                          f"or max_position_embeddings")
    # MindSpeed-LLM computes a dense model's YaRN from max_position_embeddings / original (and checks
    # that --rope-scaling-factor says the same).
    factor = max_pos / original
    if arg("rope_scaling_factor") is not None and args.rope_scaling_factor != factor:
        raise ConfigError(f"{source}: checkpoint args set rope_scaling_factor={args.rope_scaling_factor} but "
                          f"max_position_embeddings / rope_scaling_original_max_position_embeddings = {factor}, "
                          f"which MindSpeed-LLM uses")
    return canonical(_yarn_from_mindspeed(factor, original, arg("beta_fast"), arg("beta_slow"),
                                          arg("rope_scaling_mscale"), arg("rope_scaling_mscale_all_dim")),
                     max_pos, source)
