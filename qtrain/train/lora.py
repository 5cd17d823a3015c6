"""LoRA: low-rank adapters on the model's linear layers, trained with the base frozen.

`inject_lora(model, LoRAConfig(...))` swaps each targeted `nn.Linear` for a `LoRALinear` that
*keeps the same weight Parameter* under the same name (`...q_proj.weight`) and adds
`...q_proj.lora_A.weight` [r, in] and `...q_proj.lora_B.weight` [out, r]; every other parameter
is frozen. The output is `W x + b + (B A dropout(x)) * alpha / r`, as peft's LoRA layer computes,
with peft's initialisation (A Kaiming-uniform, B zero: training starts from the base model).

Because the base weight keeps its HF name, checkpoints, HF loading and the model's forward are
unchanged; the adapter alone is written in the PEFT format by qtrain.checkpoint.adapter
(`save_adapter` here gathers the tensors), which `peft.PeftModel.from_pretrained(model, dir)` loads.

The LM head (`lm_head`, a target only when named) never runs as a linear layer in training: the
chunked loss multiplies its weight chunk by chunk (qtrain.ops.linear_cross_entropy). So a LoRA
head gives the loss `folded_weight()` = W + B A alpha/r, through which the adapter's gradients
flow (the full [V, H] delta exists for the loss's duration); dropout on the head's input cannot be
folded into a weight, so an `lm_head` target needs --lora-dropout 0.

`adapters_disabled(model)` runs the base model alone (the reference model of preference training).

Qwen3-MoE experts (stacked weights, not nn.Linear) take a per-expert low-rank pair
(qtrain.train.lora_experts) when gate_proj, up_proj and down_proj are all targets; a subset of
them on an MoE model is refused by name (gate and up are one stacked weight).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.checkpoint.adapter import HEAD_TARGET, PEFT_PREFIX, LoRAConfig, write_adapter
from qtrain.errors import ConfigError
from qtrain.parallel.full_tensors import full_tensor
from qtrain.train.lora_experts import PROJECTIONS, LoRAExperts, per_expert_pairs

_EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")

class LoRALinear(nn.Linear):
    """An nn.Linear (frozen weight, same parameter names) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self.disabled = False  # see adapters_disabled
        if dev.type != "meta":
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's default: A ~ Kaiming-uniform(a=sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def folded_weight(self) -> torch.Tensor:
        """W + B A alpha/r in the compute dtype: what the chunked LM-head loss multiplies (module doc)."""
        if self.disabled:
            return self.weight
        return self.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """B @ A * alpha / r, in float32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter and wrap each targeted linear in place; returns the wrapped module names."""
    if HEAD_TARGET in cfg.target_modules:
        if cfg.dropout > 0:
            raise ConfigError(f"--lora-target-modules {HEAD_TARGET} needs --lora-dropout 0: the LM-head loss folds "
                              f"the adapter into the head weight, and dropout on the head's input cannot be folded")
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise ConfigError(f"--lora-target-modules {HEAD_TARGET}: this model ties the LM head to the input "
                              f"embedding, so a merged head adapter would change the embedding too (or be lost "
                              f"in a tied export); leave {HEAD_TARGET} out for tied models")
    from qtrain.models.moe import Qwen3MoeExperts

    experts = [name for name, m in model.named_modules() if type(m) is Qwen3MoeExperts]
    chosen = [t for t in _EXPERT_TARGETS if t in cfg.target_modules]
    if experts and chosen and len(chosen) < 3:
        raise ConfigError(f"--lora-target-modules {','.join(cfg.target_modules)}: on a Qwen3-MoE model the experts "
                          f"take LoRA on gate_proj, up_proj and down_proj together (gate and up are one stacked "
                          f"weight); name all three, or none of them")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    if experts and chosen:
        for name in experts:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, LoRAExperts(model.get_submodule(name), cfg.r, cfg.alpha))
            wrapped.append(name)
        if cfg.dropout > 0:
            raise ConfigError("--lora-dropout: LoRA on Qwen3-MoE experts is computed without dropout (as peft's, "
                              "which refuses it for expert parameters); use --lora-dropout 0")
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in cfg.target_modules and type(module) is nn.Linear:
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, leaf, LoRALinear(module, cfg.r, cfg.alpha, cfg.dropout))
            wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"--lora-target-modules {','.join(cfg.target_modules)}: no such linear layer in the model")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_experts(model: nn.Module) -> dict[str, LoRAExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes as its base weights alone (every adapter skipped)."""
    modules = list(lora_modules(model).values()) + list(lora_experts(model).values())
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m in modules:
            m.disabled = False


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's names (fp32, CPU, unsharded). Collective when sharded."""
    out = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight.detach()
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = full_tensor(w).float().cpu().contiguous()
    for name, m in lora_experts(model).items():
        for proj in PROJECTIONS:
            lora = getattr(m, f"{proj}_lora")
            a, b = (full_tensor(t.detach()).float().cpu() for t in (lora.lora_A, lora.lora_B))
            out.update(per_expert_pairs(f"{PEFT_PREFIX}{name}", proj, a, b))
    return out


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter dir (single process; see `write_adapter`)."""
    return write_adapter(adapter_state_dict(model), cfg, out_dir, base_model)


@torch.no_grad()
def merge_into_model(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (weights W + delta) in place; returns model."""
    for name, m in lora_modules(model).items():
        m.weight.add_(m.delta_weight().to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    from qtrain.models.moe import Qwen3MoeExperts

    for name, m in lora_experts(model).items():
        plain = Qwen3MoeExperts.__new__(Qwen3MoeExperts)
        nn.Module.__init__(plain)
        for proj in PROJECTIONS:
            w = getattr(m, proj)
            w.add_((getattr(m, f"{proj}_lora").delta() * m.scaling).to(w.dtype))
            setattr(plain, proj, w)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    return model
