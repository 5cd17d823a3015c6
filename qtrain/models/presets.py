"""Presets: the published Qwen3 dense and MoE sizes (values from their HF config.json) and tiny test shapes."""

from __future__ import annotations

from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config

_PUBLISHED = {
    # name: (hidden, intermediate, layers, heads, kv heads, tied)
    "0.6B": (1024, 3072, 28, 16, 8, True),
    "1.7B": (2048, 6144, 28, 16, 8, True),
    "4B": (2560, 9728, 36, 32, 8, True),
    "8B": (4096, 12288, 36, 32, 8, False),
    "14B": (5120, 17408, 40, 40, 8, False),
    "32B": (5120, 25600, 64, 64, 8, False),
}

PRESETS: dict[str, Qwen3Config] = {
    name: Qwen3Config(
        hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
        num_key_value_heads=kv, head_dim=128, tie_word_embeddings=tied,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    )
    for name, (h, i, n, a, kv, tied) in _PUBLISHED.items()
}
# The real vocabulary with a small body: trains on CPU in minutes with the real tokenizer.
PRESETS["tiny"] = Qwen3Config(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rope_theta=10_000.0,
)

# Qwen3 MoE (Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B config.json): every layer sparse,
# 128 experts, 8 routed per token, top-k weights renormalised; intermediate_size is the dense MLP
# width those configs carry (unused: no layer is dense).
_PUBLISHED_MOE = {
    # name: (hidden, intermediate, moe intermediate, layers, heads, kv heads)
    "30B-A3B": (2048, 6144, 768, 48, 32, 4),
    "235B-A22B": (4096, 12288, 1536, 94, 64, 4),
}
for _name, (_h, _i, _mi, _n, _a, _kv) in _PUBLISHED_MOE.items():
    PRESETS[_name] = Qwen3Config(
        hidden_size=_h, intermediate_size=_i, num_hidden_layers=_n, num_attention_heads=_a,
        num_key_value_heads=_kv, head_dim=128, tie_word_embeddings=False, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=_mi, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, output_router_logits=False,
    )
# The tiny body with 8 experts, 2 routed, every layer sparse: an MoE run on CPU in minutes.
PRESETS["tiny-moe"] = Qwen3Config(**{
    **vars(PRESETS["tiny"]), "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
    "norm_topk_prob": True, "tie_word_embeddings": False, "mlp_only_layers": []})


def get_preset(name: str) -> Qwen3Config:
    """A fresh copy of a preset config; names are case-insensitive ("1.7b", "Qwen3-1.7B")."""
    key = name.removeprefix("Qwen3-").removeprefix("qwen3-").upper().replace("TINY", "tiny").replace("-MOE", "-moe")
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = vars(PRESETS[key])
    return Qwen3Config(**{**fields, "mlp_only_layers": list(fields["mlp_only_layers"])})
