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

A Qwen3-MoE layer's MLP is a router (``mlp.router.weight``, replicated) and experts split over
expert-parallel (EP) ranks, each rank holding experts [r * E/EP, (r + 1) * E/EP) in one of two
layouts (MindSpeed-LLM's convert_ckpt_v2 writes both):

- per expert (``--moe-grouped-gemm`` off; megatron-core's SequentialMLP):
  ``mlp.experts.local_experts.{i}.linear_fc1/linear_fc2.weight``, each split over TP like a dense MLP;
- grouped (``--moe-grouped-gemm``; megatron-core's GroupedMLP): ``mlp.experts.weight1`` holds the
  rank's experts' fc1 *transposed*, [E_local, H, 2I/TP] stored as [H, E_local * 2I/TP] (GroupedMLP
  reads it back with ``weight1.view(E_local, H, -1)``), and ``mlp.experts.weight2`` their fc2
  transposed, [E_local, I/TP, H] stored as [E_local * I/TP, H]. Kinds ``grouped_fc1`` / ``grouped_fc2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config

REPLICATED, VOCAB, QKV, FC1, ROW = "replicated", "vocab", "qkv", "fc1", "row"
GROUPED_FC1, GROUPED_FC2 = "grouped_fc1", "grouped_fc2"


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


def num_experts(cfg: Qwen3Config) -> int:
    """Routed experts per MoE layer; 0 for a dense model."""
    return cfg.num_experts


def is_moe_layer(cfg: Qwen3Config, layer: int) -> bool:
    """Whether layer `layer` routes to experts (Qwen3Config.is_sparse_layer, transformers' rule)."""
    return cfg.is_sparse_layer(layer)


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """HF's per-expert tensors (gate, up, down) of one expert, as hf_param_names lists them."""
    e = f"model.layers.{layer}.mlp.experts.{expert}."
    return e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight"


def moe_mlp_specs(cfg: Qwen3Config, m: str, layer: int, ep_rank: int, ep_size: int,
                  grouped: bool) -> list[ParamSpec]:
    """Router and EP rank `ep_rank`'s experts of MoE layer `layer` (Megatron prefix `m`)."""
    specs = [ParamSpec(m + "mlp.router.weight", (f"model.layers.{layer}.mlp.gate.weight",), REPLICATED)]
    local = num_experts(cfg) // ep_size
    experts = [expert_names(layer, ep_rank * local + i) for i in range(local)]
    if grouped:
        return specs + [
            ParamSpec(m + "mlp.experts.weight1", tuple(n for g, u, _ in experts for n in (g, u)), GROUPED_FC1),
            ParamSpec(m + "mlp.experts.weight2", tuple(d for _, _, d in experts), GROUPED_FC2)]
    for i, (gate, up, down) in enumerate(experts):
        e = f"{m}mlp.experts.local_experts.{i}."
        specs += [ParamSpec(e + "linear_fc1.weight", (gate, up), FC1), ParamSpec(e + "linear_fc2.weight", (down,), ROW)]
    return specs


def layer_specs(local: int, layer: int, cfg: Qwen3Config | None = None, ep_rank: int = 0, ep_size: int = 1,
                grouped: bool = False) -> list[ParamSpec]:
    """Megatron parameters of decoder layer `layer` stored as chunk-local layer `local`; for a MoE
    layer, the router and the experts of EP rank `ep_rank`."""
    m, h = f"decoder.layers.{local}.", f"model.layers.{layer}."
    if cfg is not None and is_moe_layer(cfg, layer):
        return layer_specs(local, layer)[:-2] + moe_mlp_specs(cfg, m, layer, ep_rank, ep_size, grouped)
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
                pp_size: int, ep_rank: int = 0, ep_size: int = 1, grouped: bool = False) -> list[ParamSpec]:
    """All parameters of one model chunk, in the order GPTModel.state_dict() lists them.

    With tied embeddings and PP > 1 the last stage owns its own copy of the embedding as
    `output_layer.weight` (megatron-core allocates it there and keeps it in sync), so it is written.
    """
    specs: list[ParamSpec] = []
    if pre_process:
        specs.append(ParamSpec("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB))
    for local, layer in enumerate(layers):
        specs += layer_specs(local, layer, cfg, ep_rank, ep_size, grouped)
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
# The experts of SequentialMLP are such layers too; the router and GroupedMLP's weight1/weight2 have none.
_LINEARS = (".self_attention.linear_qkv.weight", ".self_attention.linear_proj.weight", ".mlp.linear_fc1.weight",
            ".mlp.linear_fc2.weight", ".linear_fc1.weight", ".linear_fc2.weight")


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
    sizes = [("num_attention_heads", cfg.num_attention_heads),
             ("num_key_value_heads (query groups)", cfg.num_key_value_heads), ("vocab_size", cfg.vocab_size)]
    if any(not is_moe_layer(cfg, i) for i in range(cfg.num_hidden_layers)):
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if num_experts(cfg):
        sizes.append(("moe_intermediate_size", cfg.moe_intermediate_size))
    for what, n in sizes:
        if n % tp:
            raise ConfigError(
                f"tensor parallel size {tp} does not divide the model's {what} ({n}); "
                f"choose a --target-tensor-parallel-size that divides it")
    if cfg.attention_bias:
        raise ConfigError("attention_bias=true is not a Qwen3 dense layout; Megatron conversion supports "
                          "bias-free attention only")


def check_ep(cfg: Qwen3Config, ep: int) -> None:
    """EP must divide the experts (MindSpeed-LLM's and Megatron's rule); EP > 1 needs experts."""
    if ep < 1:
        raise ConfigError(f"--target-expert-parallel-size must be >= 1, got {ep}")
    if ep > 1 and not num_experts(cfg):
        raise ConfigError(f"--target-expert-parallel-size {ep}: the model is dense (no experts); leave it at 1")
    if num_experts(cfg) % ep:
        raise ConfigError(f"expert parallel size {ep} does not divide the model's num_experts ({num_experts(cfg)}); "
                          f"choose a --target-expert-parallel-size that divides it")


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
    elif spec.kind == GROUPED_FC1:  # per expert [gate_t; up_t]^T: [H, 2I/TP], stacked, stored as [H, E * 2I/TP]
        blocks = [torch.cat([g.chunk(tp, dim=0)[rank], u.chunk(tp, dim=0)[rank]]).t()
                  for g, u in zip(tensors[0::2], tensors[1::2])]
        return torch.stack(blocks).reshape(tensors[0].shape[1], -1)
    elif spec.kind == GROUPED_FC2:  # per expert down_t^T: [I/TP, H], stacked, stored as [E * I/TP, H]
        blocks = [d.chunk(tp, dim=1)[rank].t() for d in tensors]
        return torch.stack(blocks).reshape(-1, tensors[0].shape[0])
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
    if spec.kind == GROUPED_FC1:
        n, hidden = len(spec.hf_names) // 2, shards[0].shape[0]
        per_rank = [s.reshape(n, hidden, -1) for s in shards]  # as GroupedMLP views weight1
        out = []
        for j in range(n):
            halves = [r[j].t().chunk(2, dim=0) for r in per_rank]
            out += [torch.cat([h[0] for h in halves]).contiguous(), torch.cat([h[1] for h in halves]).contiguous()]
        return out
    if spec.kind == GROUPED_FC2:
        n, hidden = len(spec.hf_names), shards[0].shape[1]
        per_rank = [s.reshape(n, -1, hidden) for s in shards]
        return [torch.cat([r[j].t() for r in per_rank], dim=1).contiguous() for j in range(n)]
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
    key = re.sub(r"\.mlp\.experts\.linear_fc([12])\.weight(\d+)$", r".mlp.experts.local_experts.\2.linear_fc\1.weight",
                 key)  # TEGroupedMLP: one weight per local expert, each as SequentialMLP's
    return (key.replace(".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight")
               .replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"))
