"""Rotary position embedding (the "rotate half" layout used by Qwen3 / Hugging Face).

`apply_rope_qk` rotates q and k together, which lets Liger-Kernel's Triton kernel do both in one
launch on CUDA (in place, saving only cos/sin for the backward); torch_npu's npu_rotary_mul on
Ascend; the reference elsewhere. See dispatch.py.
"""

import torch

from qtrain.ops import dispatch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B, S, head_dim] for integer positions [B, S], computed in float32.

    Computed from positions on every call (a few kFLOPs) instead of a cached buffer, so the model
    has no buffers to re-create after meta-device initialisation and packed samples may restart
    positions anywhere.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    with torch.autocast(device_type=position_ids.device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


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
