"""Rotary position embedding (the "rotate half" layout used by Qwen3 / Hugging Face), plain or scaled (yarn, linear).

`rope_frequencies` computes the frequencies (and YaRN's cos/sin scale) as transformers does, once
per setting and device; `rope_cos_sin` turns positions into cos/sin per forward.
`apply_rope_qk` rotates q and k together, which lets Liger-Kernel's Triton kernel do both in one
launch on CUDA (in place, saving only cos/sin for the backward); torch_npu's npu_rotary_mul on
Ascend; the reference elsewhere. See dispatch.py.
"""

import functools
import math

import torch

from qtrain.ops import dispatch


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _yarn_inv_freq(head_dim: int, theta: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: interpolate (divide by the factor) the
    low frequencies, keep (extrapolate) the high ones, blend linearly between the dimensions that
    turn beta_fast and beta_slow times over original_max_position_embeddings; scale cos/sin by
    the attention factor."""
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if "attention_factor" in s:
        attention = s["attention_factor"]
    elif "mscale" in s:
        attention = float(mscale(s["mscale"]) / mscale(s["mscale_all_dim"]))
    else:
        attention = mscale(1)

    def dim_turning(turns: float) -> float:  # the dimension whose wavelength fits `turns` times in `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(s.get("beta_fast", 32)), dim_turning(s.get("beta_slow", 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is kept (high frequencies), 0 where interpolated
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, attention


@functools.lru_cache(maxsize=64)
def _frequencies(head_dim: int, theta: float, scaling: tuple, device: torch.device) -> tuple[torch.Tensor, float]:
    # Computed on the CPU in float32 (as transformers does at init), then moved: the same bits on every device.
    with torch.inference_mode(False), torch.no_grad():
        s = dict(scaling)
        rope_type = s.get("rope_type")
        if rope_type is None:
            inv_freq, attention = _default_inv_freq(head_dim, theta), 1.0
        elif rope_type == "linear":
            inv_freq, attention = _default_inv_freq(head_dim, theta) / s["factor"], 1.0
        elif rope_type == "yarn":
            inv_freq, attention = _yarn_inv_freq(head_dim, theta, s)
        else:
            raise ValueError(f"unknown rope_type {rope_type!r}")  # models/rope_scaling.py refuses it before
        return inv_freq.to(device), attention


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [head_dim/2] on `device`, cos/sin scale) for plain RoPE (`scaling` None) or
    a canonical rope_scaling dict (models/rope_scaling.py: linear, yarn). Cached: a forward pays a
    dictionary lookup, not the computation. Do not modify the returned tensor."""
    key = tuple(sorted(scaling.items())) if scaling else ()
    return _frequencies(int(head_dim), float(theta), key, torch.device(device))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: dict | None = None):
    """cos, sin of shape [B, S, head_dim] for integer positions [B, S], computed in float32.

    Computed from positions on every call (the frequencies are cached, see rope_frequencies), so
    the model has no buffers to re-create after meta-device initialisation and packed samples may
    restart positions anywhere.
    """
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling, position_ids.device)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if attention != 1.0:
            cos, sin = cos * attention, sin * attention
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, head_dim]; cos/sin: [B, S, head_dim]."""
    if dispatch.impl("rope", x.device) == "npu" and x.dtype == cos.dtype and dispatch.plain(x):
        return dispatch.npu().npu_rotary_mul(x, cos.unsqueeze(1), sin.unsqueeze(1))
    return apply_rope_reference(x, cos, sin)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(apply_rope(q), apply_rope(k)); q: [B, Hq, S, D], k: [B, Hkv, S, D]."""
    if (dispatch.impl("rope", q.device) == "liger" and q.dtype == k.dtype == cos.dtype
            and dispatch.plain(q, k)):
        return dispatch.liger().LigerRopeFunction.apply(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
