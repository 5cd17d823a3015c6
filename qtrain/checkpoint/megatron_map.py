"""Which Megatron-core parameter holds which Hugging Face tensors, and how it is split over TP.

Names follow megatron-core's GPT local layer spec (the one MindSpeed-LLM uses). Each Megatron
parameter is one `ParamSpec`: its name inside a model chunk, the HF tensors it is made of, and a
`kind` that says how it is assembled and split across tensor-parallel ranks:

- ``replicated``: layer norms, identical on every rank;
- ``vocab``: embedding / output layer rows (vocab-parallel);
- ``qkv``: q, k, v interleaved per query group -- for each group its q heads, one k head, one v
  head -- then split by groups;
- ``fc1``: gate and up each split by rows, then concatenated per rank as [gate_i; up_i];
- ``row``: input columns split (linear_proj, linear_fc2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config

REPLICATED, VOCAB, QKV, FC1, ROW = "replicated", "vocab", "qkv", "fc1", "row"


@dataclass(frozen=True)
class ParamSpec:
    """One Megatron parameter: its chunk-local name, its HF source tensors, how it is sharded."""

    mg_name: str
    hf_names: tuple[str, ...]
    kind: str


def hf_param_names(cfg: Qwen3Config) -> list[str]:
    """The HF tensor names of a Qwen3 checkpoint in file order (lm_head only when untied); a
    Qwen3-MoE sparse layer's experts under their per-expert names (qtrain.models.hf_experts)."""
    from qtrain.models.hf_experts import per_expert_names

    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + n for n in (
            "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
            "self_attn.k_norm.weight", "post_attention_layernorm.weight")]
        if cfg.is_sparse_layer(i):
            names += [p + "mlp.gate.weight"] + per_expert_names(p + "mlp.experts", cfg.num_experts)
        else:
            names += [p + n for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def layer_specs(local: int, layer: int) -> list[ParamSpec]:
    """Megatron parameters of decoder layer `layer` stored as chunk-local layer `local`."""
    m, h = f"decoder.layers.{local}.", f"model.layers.{layer}."
    return [
        ParamSpec(m + "input_layernorm.weight", (h + "input_layernorm.weight",), REPLICATED),
        ParamSpec(m + "self_attention.linear_qkv.weight",
                  (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight"), QKV),
        ParamSpec(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",), REPLICATED),
        ParamSpec(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",), REPLICATED),
        ParamSpec(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), ROW),
        ParamSpec(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), REPLICATED),
        ParamSpec(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), FC1),
        ParamSpec(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), ROW),
    ]


def chunk_specs(cfg: Qwen3Config, layers: list[int], pre_process: bool, post_process: bool,
                pp_size: int) -> list[ParamSpec]:
    """All parameters of one model chunk, in the order GPTModel.state_dict() lists them.

    With tied embeddings and PP > 1 the last stage owns its own copy of the embedding as
    `output_layer.weight` (megatron-core allocates it there and keeps it in sync), so it is written.
    """
    specs: list[ParamSpec] = []
    if pre_process:
        specs.append(ParamSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB))
    for local, layer in enumerate(layers):
        specs += layer_specs(local, layer)
    if post_process:
        specs.append(ParamSpec("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
        if not cfg.tie_word_embeddings:
            specs.append(ParamSpec("output_layer.weight", ("lm_head.weight",), VOCAB))
        elif pp_size > 1:
            specs.append(ParamSpec("output_layer.weight", ("model.embed_tokens.weight",), VOCAB))
    return specs


# megatron-core's ColumnParallelLinear / RowParallelLinear keep an empty `_extra_state` (None) in their
# state dict, where Transformer Engine layers keep fp8 metadata: GPTModel.state_dict() (MindSpeed-LLM's
# qwen3_spec, megatron-core's local spec) lists one after each linear weight, and one for output_layer on
# the last stage even when that layer borrows the embedding's weight. Megatron's own files carry them.
_LINEARS = (".self_attention.linear_qkv.weight", ".self_attention.linear_proj.weight", ".mlp.linear_fc1.weight",
            ".mlp.linear_fc2.weight")


def with_extra_state(state: dict[str, torch.Tensor], post_process: bool) -> dict[str, torch.Tensor | None]:
    """A chunk's state dict with the `_extra_state` entries GPTModel.state_dict() has, in its places."""
    out: dict[str, torch.Tensor | None] = {}
    for name, tensor in state.items():
        out[name] = tensor
        if name.endswith(_LINEARS) or name == "output_layer.weight":
            out[name[: -len("weight")] + "_extra_state"] = None
    if post_process:
        out.setdefault("output_layer._extra_state", None)
    return out


def check_tp(cfg: Qwen3Config, tp: int) -> None:
    """TP must divide query heads, KV groups, the MLP width and the vocabulary."""
    if tp < 1:
        raise ConfigError(f"--target-tensor-parallel-size must be >= 1, got {tp}")
    for what, n in (("num_attention_heads", cfg.num_attention_heads),
                    ("num_key_value_heads (query groups)", cfg.num_key_value_heads),
                    ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size)):
        if n % tp:
            raise ConfigError(
                f"tensor parallel size {tp} does not divide the model's {what} ({n}); "
                f"choose a --target-tensor-parallel-size that divides it")
    if cfg.attention_bias:
        raise ConfigError("attention_bias=true is not a Qwen3 dense layout; Megatron conversion supports "
                          "bias-free attention only")


def _qkv_rank(cfg: Qwen3Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rows of linear_qkv for TP rank `rank`: its query groups, each [q heads; k head; v head]."""
    groups, d = cfg.num_key_value_heads, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = q.shape[1]
    g = slice(rank * groups // tp, (rank + 1) * groups // tp)
    return torch.cat([q.reshape(groups, per_group * d, hidden)[g], k.reshape(groups, d, hidden)[g],
                      v.reshape(groups, d, hidden)[g]], dim=1).reshape(-1, hidden)


def shard(spec: ParamSpec, tensors: list[torch.Tensor], cfg: Qwen3Config, tp: int, rank: int) -> torch.Tensor:
    """HF tensors -> TP rank `rank`'s compact slice (a copy, so a file stores only its slice)."""
    if spec.kind == REPLICATED:
        return tensors[0]
    if spec.kind == VOCAB:
        part = torch.chunk(tensors[0], tp, dim=0)[rank]
    elif spec.kind == ROW:
        part = torch.chunk(tensors[0], tp, dim=1)[rank]
    elif spec.kind == QKV:
        return _qkv_rank(cfg, *tensors, tp, rank)
    elif spec.kind == FC1:
        return torch.cat([torch.chunk(tensors[0], tp, dim=0)[rank], torch.chunk(tensors[1], tp, dim=0)[rank]])
    else:
        raise ValueError(f"unknown shard kind {spec.kind!r}")
    return part.clone() if tp > 1 else part


def merge(spec: ParamSpec, shards: list[torch.Tensor], cfg: Qwen3Config) -> list[torch.Tensor]:
    """One tensor per TP rank -> the HF tensors named by `spec.hf_names` (inverse of `split`)."""
    if spec.kind == REPLICATED:
        return [shards[0]]
    if spec.kind == VOCAB:
        return [torch.cat(shards, dim=0) if len(shards) > 1 else shards[0]]
    if spec.kind == ROW:
        return [torch.cat(shards, dim=1) if len(shards) > 1 else shards[0]]
    if spec.kind == FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if spec.kind == QKV:
        groups, d = cfg.num_key_value_heads, cfg.head_dim
        per_group = cfg.num_attention_heads // groups
        full = torch.cat(shards, dim=0) if len(shards) > 1 else shards[0]
        hidden = full.shape[1]
        full = full.reshape(groups, (per_group + 2) * d, hidden)
        q = full[:, : per_group * d].reshape(-1, hidden)
        k = full[:, per_group * d: (per_group + 1) * d].reshape(-1, hidden)
        v = full[:, (per_group + 1) * d:].reshape(-1, hidden)
        return [q.contiguous(), k.contiguous(), v.contiguous()]
    raise ValueError(f"unknown shard kind {spec.kind!r}")


def normalize_key(key: str) -> str | None:
    """Map a Transformer-Engine-spec key to its local-spec name; None for keys with no weight."""
    if key.endswith("._extra_state"):
        return None
    return (key.replace(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight")
               .replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"))
