"""Presets: the published Qwen3 dense sizes (values from their HF config.json) and tiny test shapes."""

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


def get_preset(name: str) -> Qwen3Config:
    """A fresh copy of a preset config; names are case-insensitive ("1.7b", "Qwen3-1.7B")."""
    key = name.removeprefix("Qwen3-").removeprefix("qwen3-").upper().replace("TINY", "tiny")
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Qwen3Config(**vars(PRESETS[key]))
