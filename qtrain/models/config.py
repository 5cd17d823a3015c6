"""Qwen3Config: the shape of a Qwen3 dense model, with Hugging Face's field names."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qtrain.errors import ConfigError
from qtrain.models.hf_config_keys import HF_DEFAULTS, check_hf_keys
from qtrain.models.rope_scaling import canonical, read_hf_rope


@dataclass
class Qwen3Config:
    """Hyper-parameters of a Qwen3 dense decoder (names as in HF config.json)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    # None: plain RoPE; else HF's rope_scaling dict in qtrain's canonical form (models/rope_scaling.py)
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        self.rope_scaling = canonical(self.rope_scaling, self.max_position_embeddings, "model config: rope_scaling")

    @property
    def num_params(self) -> int:
        """Parameter count, the tied embedding counted once (as HF's model.num_parameters())."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3Config":
        """Read an HF config.json dict. Keys it leaves out take transformers' Qwen3Config defaults
        (not qtrain's), so the model is the one transformers would build; every key qtrain does not
        implement is refused by name (models/hf_config_keys.py, models/rope_scaling.py)."""
        if d.get("model_type") != "qwen3":
            raise ConfigError(
                f"{source}: model_type is {d.get('model_type')!r}, qtrain supports 'qwen3' (dense Qwen3) only")
        check_hf_keys(d, source)
        kwargs = {k: d.get(k, HF_DEFAULTS[k]) for k in HF_DEFAULTS}
        if d.get("num_key_value_heads", 0) is None:  # transformers: null means one per query head
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        kwargs["rope_theta"], kwargs["rope_scaling"] = read_hf_rope(d, source, kwargs["max_position_embeddings"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The config.json that transformers' Qwen3ForCausalLM and vLLM-style loaders read.

        RoPE is written in transformers 4's spelling (rope_theta + rope_scaling), which qtrain's
        minimum transformers (4.51), transformers 5 and vLLM all read."""
        d = asdict(self)
        d.update(
            architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
            attention_dropout=0.0, max_window_layers=self.num_hidden_layers, sliding_window=None,
            use_sliding_window=False, use_cache=True, torch_dtype=dtype,
        )
        return d
