"""A static key/value cache for incremental decoding, and the cached forward that uses it.

The model file (qtrain/models/qwen3.py) knows nothing of caches: `cached_forward` runs the same
submodules (projections, q/k norms, RoPE, MLP, norms) in the same order, but attends each new
query over every key seen so far, kept here. One preallocated buffer per layer (no
concatenation per token), filled left to right; every sequence of a batch shares the write
position, so left-padded prompts of different lengths decode in lockstep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.ops.rope import apply_rope, rope_cos_sin


class KVCache:
    """Keys and values of every layer: [B, kv_heads, max_len, head_dim] each, plus the fill length."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled (in every layer once a forward has finished)

    @classmethod
    def for_model(cls, model: Qwen3ForCausalLM, batch: int, max_len: int) -> "KVCache":
        cfg = model.config
        p = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim, p.dtype, p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v [B, Hkv, s, D] at the fill position; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated "
                             "(raise max_new_tokens' budget or shorten the prompt)")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps


def _attend(module: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
            layer: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Qwen3Attention.forward with past keys/values (same submodules, same order of operations)."""
    b, s, _ = x.shape
    d = module.head_dim
    q = module.q_norm(module.q_proj(x).view(b, s, -1, d)).transpose(1, 2)
    k = module.k_norm(module.k_proj(x).view(b, s, -1, d)).transpose(1, 2)
    v = module.v_proj(x).view(b, s, -1, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.update(layer, k, v)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        # Unpadded batch: the prefill is plain causal attention, one new query sees every key.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return module.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def decode_mask(key_valid: torch.Tensor, start: int, steps: int) -> torch.Tensor:
    """Bool [B, 1, steps, start+steps]: query at absolute position start+i attends key j when
    j <= start+i and key j is not padding. A padding query attends itself only, so no row is
    empty (an all-masked row would make softmax NaN); its output is never used."""
    total = start + steps
    q_pos = torch.arange(start, total, device=key_valid.device)[:, None]
    k_pos = torch.arange(total, device=key_valid.device)[None, :]
    causal = k_pos <= q_pos
    mask = causal[None] & key_valid[:, None, :total]
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


def padded_positions(key_valid: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (left padding does not shift them): [B, S]."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def cached_forward(model: Qwen3ForCausalLM, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   cache: KVCache, mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
    """Logits of `input_ids` [B, s] continuing the cached prefix; the cache grows by s.

    `mask`: bool [B, 1, s, cache.length + s] (see `decode_mask`) or None for an unpadded batch.
    `last_only`: compute the LM head for the last position only (all decoding needs).
    """
    m = model.model
    if mask is None and input_ids.shape[1] > 1 and cache.length > 0:  # several new queries after a prefix
        all_valid = torch.ones(input_ids.shape[0], cache.length + input_ids.shape[1], dtype=torch.bool,
                               device=input_ids.device)
        mask = decode_mask(all_valid, cache.length, input_ids.shape[1])
    h = m.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(position_ids, model.config.head_dim, model.config.rope_theta, h.dtype,
                            model.config.rope_scaling)
    for i, layer in enumerate(m.layers.values()):
        h = h + _attend(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, i, mask)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    cache.advance(input_ids.shape[1])
    if last_only:
        h = h[:, -1:]
    return model.lm_head(m.norm(h))
