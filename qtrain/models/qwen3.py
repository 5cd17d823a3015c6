"""The Qwen3 decoder (dense, or mixture-of-experts: qtrain.models.moe) as a plain nn.Module.

Parameter names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so HF
checkpoints load by name and DCP checkpoints read like HF ones. No parallelism, device or
checkpoint code lives here: `qtrain.parallel` transforms this module from the outside.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.models.config import Qwen3Config
from qtrain.models.moe import Qwen3MoeExperts, Qwen3MoeRouter, Qwen3MoeSparseMoeBlock, RouterStats, load_balancing_loss
from qtrain.ops.attention import attention
from qtrain.ops.linear_cross_entropy import linear_cross_entropy
from qtrain.ops.rmsnorm import rms_norm
from qtrain.ops.rope import apply_rope_qk, rope_cos_sin
from qtrain.ops.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        # Heads are inferred (-1) rather than read from the config, so a tensor-parallel shard of
        # these projections (fewer local heads) runs this same code.
        q = self.q_norm(self.q_proj(x).view(b, s, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope_qk(q, k, cos, sin)
        out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Qwen3-MoE: the experts block on the layers transformers makes sparse, the dense MLP elsewhere
        self.mlp = Qwen3MoeSparseMoeBlock(cfg) if cfg.is_sparse_layer(layer_idx) else Qwen3MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Keyed by the global layer index ("0", "1", ...): a pipeline stage keeps a subset under the
        # same keys, so parameter names stay HF names on every layout.
        self.layers = nn.ModuleDict({str(i): Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 causal LM. `model(input_ids) -> logits [B, S, V]`.

    Pipeline stages may drop modules (set `model.embed_tokens`, `model.norm` or `lm_head` to None,
    or delete entries of `model.layers`): forward then takes / returns hidden states where the
    missing piece would be.
    """

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config says so.

        Must be called again after `to_empty()`, which gives each module a fresh tensor.
        """
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, S, H] (the LM head's input), e.g. for a fused loss.

        input_ids: int [B, S] (or hidden states [B, S, H] on a pipeline stage without embedding).
        position_ids: int [B, S], default 0..S-1. attention_mask: optional bool [B, 1, S, S],
        True where a query may attend a key (already causal), for packed samples.
        """
        m = self.model
        h = m.embed_tokens(input_ids) if m.embed_tokens is not None else input_ids
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype,
                                self.config.rope_scaling)
        for layer in m.layers.values():
            h = layer(h, cos, sin, attention_mask)
        return m.norm(h) if m.norm is not None else h

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """Logits [B, S, V]; or, given `labels` [B, S] aligned with the inputs (labels[i] is the
        token after input i, -100 = ignore), the cross-entropy loss ("mean" over counted tokens,
        "sum", or "none": each token's, [B, S] float32, 0 where ignored), computed chunk by chunk
        without materialising the logits. The loss is computed here, inside forward, so that a
        sharded (FSDP) LM head is gathered while it is used."""
        h = self.hidden_states(input_ids, position_ids, attention_mask)
        if self.lm_head is None:
            return h
        if labels is None:
            return self.lm_head(h)
        return linear_cross_entropy(h, self.head_weight(), labels, reduction=loss_reduction)

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight as the loss uses it. A head that changes its weight (a LoRA-wrapped
        head, qtrain.train.lora) provides `folded_weight()`: W + its low-rank update."""
        folded = getattr(self.lm_head, "folded_weight", None)
        return folded() if folded is not None else self.lm_head.weight

    def router_stats(self) -> list[RouterStats]:
        """The routing statistics of the last forward, one per sparse layer this module holds
        (a pipeline stage: its own), in layer order; [] for a dense model."""
        return [layer.mlp.stats for layer in self.model.layers.values()
                if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) and layer.mlp.stats is not None]

    def moe_aux_loss(self) -> torch.Tensor | None:
        """transformers' load-balancing loss of the last forward (qtrain.models.moe); None when dense."""
        stats = self.router_stats()
        return load_balancing_loss(stats, self.config.num_experts) if stats else None

    @torch.no_grad()
    def init_weights(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Initialise in place as HF does: linear and embedding weights ~ N(0, std), biases 0,
        norms 1. `std` defaults to config.initializer_range. Works after `to_empty()`."""
        std = self.config.initializer_range if std is None else std
        self.tie_weights()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue  # shares the embedding's weight, initialised once
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, (Qwen3MoeRouter, Qwen3MoeExperts)):
                for param in module.parameters(recurse=False):
                    param.normal_(0.0, std, generator=generator)


def build_model(cfg: Qwen3Config, device: str | torch.device = "meta") -> Qwen3ForCausalLM:
    """Build on `device` without initialising (meta by default: no memory is allocated)."""
    with torch.device(device):
        return Qwen3ForCausalLM(cfg)
