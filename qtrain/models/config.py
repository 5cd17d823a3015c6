"""Qwen3Config: the shape of a Qwen3 model, dense or mixture-of-experts (Qwen3-MoE), with Hugging
Face's field names."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qtrain.errors import ConfigError
from qtrain.models.hf_config_keys import HF_DEFAULTS, HF_MOE_DEFAULTS, MOE_IMPLEMENTED, check_hf_keys
from qtrain.models.rope_scaling import canonical, read_hf_rope


@dataclass
class Qwen3Config:
    """Hyper-parameters of a Qwen3 decoder (names as in HF config.json). num_experts > 0 makes it
    Qwen3-MoE (model_type "qwen3_moe"): the layers `is_sparse_layer` picks have a routed-experts
    block instead of the dense MLP."""

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
    # --- mixture of experts (transformers' Qwen3MoeConfig names); num_experts 0 = dense Qwen3 ---
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

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
        self._validate_moe()

    def _validate_moe(self) -> None:
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 0:
            raise ConfigError(f"model config: num_experts must be a non-negative integer, got {self.num_experts!r}")
        if not self.is_moe:
            return
        for name in ("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) is more than "
                              f"num_experts ({self.num_experts})")
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        bad = [i for i in self.mlp_only_layers
               if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_hidden_layers]
        if bad:  # transformers would ignore them; qtrain names them
            raise ConfigError(f"model config: mlp_only_layers holds {bad!r}, not layer indices 0.."
                              f"{self.num_hidden_layers - 1}")

    @property
    def is_moe(self) -> bool:
        """A Qwen3-MoE model (some layers route tokens to experts)."""
        return self.num_experts > 0

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer i has the experts block: transformers' Qwen3MoeDecoderLayer rule."""
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i)]

    @property
    def num_params(self) -> int:
        """Parameter count, the tied embedding counted once (as HF's model.num_parameters());
        for MoE, every expert counted (see num_active_params)."""
        return self._count(self.num_experts)

    @property
    def num_active_params(self) -> int:
        """Parameters one token passes through: for MoE, the router and its num_experts_per_tok
        experts per sparse layer (the "A3B" of Qwen3-30B-A3B); the same as num_params when dense."""
        return self._count(self.num_experts_per_tok if self.is_moe else 0)

    def _count(self, experts: int) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim + (q + 2 * kv if self.attention_bias else 0)
        sparse = len(self.sparse_layers)
        dense_mlp = 3 * h * self.intermediate_size
        moe_mlp = self.num_experts * h + experts * 3 * h * self.moe_intermediate_size  # router + experts
        layers = self.num_hidden_layers * (attn + 2 * h) + (self.num_hidden_layers - sparse) * dense_mlp
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + sparse * moe_mlp + embed + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3Config":
        """Read an HF config.json dict. Keys it leaves out take transformers' Qwen3Config defaults
        (not qtrain's), so the model is the one transformers would build; every key qtrain does not
        implement is refused by name (models/hf_config_keys.py, models/rope_scaling.py)."""
        if d.get("model_type") not in ("qwen3", "qwen3_moe"):
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, qtrain supports 'qwen3' (dense "
                              f"Qwen3) and 'qwen3_moe' (Qwen3 MoE) only")
        check_hf_keys(d, source)
        moe = d["model_type"] == "qwen3_moe"
        defaults = HF_MOE_DEFAULTS if moe else HF_DEFAULTS
        if moe and "num_local_experts" in d:  # transformers 5's spelling of num_experts
            if "num_experts" in d and d["num_experts"] != d["num_local_experts"]:
                raise ConfigError(f"{source}: num_experts ({d['num_experts']}) and num_local_experts "
                                  f"({d['num_local_experts']}) disagree")
            d = {**d, "num_experts": d["num_local_experts"]}
        kwargs = {k: d.get(k, defaults[k]) for k in defaults}
        if d.get("num_key_value_heads", 0) is None:  # transformers: null means one per query head
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if moe and kwargs["head_dim"] is None:  # Qwen3MoeAttention: hidden_size // num_attention_heads
            heads = kwargs["num_attention_heads"]
            kwargs["head_dim"] = kwargs["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else None
        if moe and kwargs["num_experts"] == 0:
            raise ConfigError(f"{source}: model_type 'qwen3_moe' with num_experts 0 is a dense model; qtrain "
                              f"reads it only as model_type 'qwen3'")
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
        if not self.is_moe:  # a dense config.json carries no MoE keys (transformers' Qwen3Config has none)
            for key in MOE_IMPLEMENTED:
                d.pop(key, None)
        d.update(
            architectures=["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"],
            model_type="qwen3_moe" if self.is_moe else "qwen3", hidden_act="silu",
            attention_dropout=0.0, max_window_layers=self.num_hidden_layers, sliding_window=None,
            use_sliding_window=False, use_cache=True, torch_dtype=dtype,
        )
        return d
