"""PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors` with peft's
names (`base_model.model.<module>.lora_A.weight`), read, written, and merged into full weights.

Training (the `LoRALinear` modules and their injection) is qtrain.train.lora; this module only
knows the file format and the arithmetic of merging, W + (B @ A) * alpha / r, so that converting,
exporting and inference never depend on the training code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qtrain.errors import CheckpointError, ConfigError
from qtrain.io_utils import atomic_path, write_json_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The output layer is a target only when named (peft's all-linear leaves it out too).
HEAD_TARGET = "lm_head"
# Megatron / MindSpeed-LLM module names -> the HF modules they fuse.
MEGATRON_TARGETS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
    "output_layer": (HEAD_TARGET,),
}
_ORDER = HF_TARGETS + (HEAD_TARGET,)


def parse_target_modules(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """HF or Megatron module names (comma/space separated, or a list) -> sorted unique HF names."""
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    out: set[str] = set()
    for item in items:
        if item in _ORDER:
            out.add(item)
        elif item in MEGATRON_TARGETS:
            out.update(MEGATRON_TARGETS[item])
        elif item in ("all-linear", "all_linear"):
            out.update(HF_TARGETS)
        else:
            raise ConfigError(f"--lora-target-modules: unknown module {item!r}; use HF names "
                              f"({','.join(_ORDER)}), Megatron names ({','.join(MEGATRON_TARGETS)}) "
                              "or all-linear")
    if not out:
        raise ConfigError("--lora-target-modules: no module given")
    return sorted(out, key=_ORDER.index)


@dataclass
class LoRAConfig:
    """Rank, scale and placement of the adapters (peft's LoraConfig fields of the same names)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(HF_TARGETS))

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"--lora-r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        self.target_modules = parse_target_modules(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_peft_dict(self, base_model: str | None = None) -> dict:
        """adapter_config.json as peft writes it for a LoRA adapter on a causal LM."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(cls, d: dict, source: str) -> "LoRAConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
        unsupported = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out") if d.get(k)]
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            unsupported.append("rank_pattern/alpha_pattern")
        if unsupported:
            raise CheckpointError(f"{source}: adapter options {unsupported} are not supported by qtrain")
        targets = d.get("target_modules")
        if isinstance(targets, str):  # peft allows a regex; keep only our module names found in it
            targets = [t for t in _ORDER if re.search(t, targets)]
        return cls(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                   target_modules=targets)


def write_adapter(tensors: dict[str, torch.Tensor], cfg: LoRAConfig, out_dir: str | Path,
                  base_model: str | None = None) -> Path:
    """Write adapter_model.safetensors then adapter_config.json (the config last marks it complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out_dir / ADAPTER_CONFIG, cfg.to_peft_dict(base_model))
    return out_dir


def load_adapter(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {HF module name: (A [r, in], B [out, r])}) from a PEFT LoRA adapter dir."""
    adapter_dir = Path(adapter_dir)
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"--lora-load {adapter_dir}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                              "(a PEFT LoRA adapter dir, as `qtrain sft --lora-r ...` or peft save)")
    peft_dict = json.loads(cfg_file.read_text())
    if peft_dict.get("target_parameters"):  # peft's adapters on nn.Parameters (e.g. fused MoE experts)
        raise CheckpointError(f"--lora-load {adapter_dir}: the adapter targets parameters "
                              f"({peft_dict['target_parameters']}); qtrain reads LoRA on modules only (Qwen3-MoE "
                              f"experts under their per-expert names, as qtrain sft writes them)")
    cfg = LoRAConfig.from_peft_dict(peft_dict, str(cfg_file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight$")
    for key, t in load_file(str(weights)).items():
        match = pattern.match(key)
        if not match:
            raise CheckpointError(f"{weights}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = t
    out = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: module {module} has {sorted(parts)}, needs lora_A and lora_B")
        out[module] = (parts["lora_A"], parts["lora_B"])
    return cfg, out


def fold_adapters(state_dict: dict[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  scaling: float, source: str) -> dict[str, torch.Tensor]:
    """A new state dict with W + (B @ A) * scaling for each {module: (A, B)} (float32 math, W's dtype)."""
    out = dict(state_dict)
    for module, (a, b) in pairs.items():
        key = f"{module}.weight"
        if key not in out:
            raise CheckpointError(f"{source}: adapter targets {module}, which the base model does not have "
                                  "(adapter made for another model?)")
        w = out[key]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"{source}: {module} adapter is {b.shape[0]}x{a.shape[1]}, "
                                  f"the base weight is {tuple(w.shape)}")
        out[key] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
    return out


def merge_lora(state_dict: dict[str, torch.Tensor], adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """HF-named full weights with a saved PEFT adapter folded in: W + (B @ A) * alpha / r.
    Returns a new dict; tensors the adapter does not touch are shared (for `qtrain convert --lora-load`)."""
    cfg, pairs = load_adapter(adapter_dir)
    return fold_adapters(state_dict, pairs, cfg.scaling, f"--lora-load {adapter_dir}")


class LoRAMergedSource:
    """A checkpoint source (qtrain.checkpoint.sources: names/get/close, config, ...) whose `get`
    returns weights with a PEFT adapter merged, one tensor at a time (for streaming converters)."""

    def __init__(self, source, adapter_dir: str | Path):
        self._source = source
        self._cfg, self._pairs = load_adapter(adapter_dir)
        self._where = f"--lora-load {adapter_dir}"
        names = set(source.names())
        missing = [m for m in self._pairs if f"{m}.weight" not in names]
        if missing:
            raise CheckpointError(f"{self._where}: adapter targets {missing[0]}, which the base checkpoint "
                                  "does not have (adapter made for another model?)")

    def get(self, name: str) -> torch.Tensor:
        tensor = self._source.get(name)
        module = name.removesuffix(".weight")
        if module in self._pairs:
            tensor = fold_adapters({name: tensor}, {module: self._pairs[module]}, self._cfg.scaling, self._where)[name]
        return tensor

    def __getattr__(self, attr: str):  # config, hf_config, iteration, tokenizer_dir, names, close, ...
        return getattr(self._source, attr)


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA-injected model's full state dict (with `.lora_A.weight` / `.lora_B.weight` keys) ->
    plain HF-named weights with the adapters merged."""
    pairs = {}
    for key in state_dict:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            pairs[module] = (state_dict[key], state_dict[f"{module}.lora_B.weight"])
    plain = {k: v for k, v in state_dict.items() if ".lora_A" not in k and ".lora_B" not in k}
    for key in state_dict:  # Qwen3-MoE experts: W [E, out, in] + B [E, out, r] @ A [E, r, in] per expert
        if key.endswith("_lora.lora_A"):
            base = key[: -len("_lora.lora_A")]
            a, b, w = state_dict[key].float(), state_dict[f"{base}_lora.lora_B"].float(), plain[base]
            plain[base] = (w.float() + torch.bmm(b, a) * scaling).to(w.dtype)
    return fold_adapters(plain, pairs, scaling, "LoRA model")


def apply_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Merge a saved PEFT adapter into a loaded (unsharded) model's weights in place (Qwen3-MoE
    experts through per-expert views of their stacked weights)."""
    from qtrain.models.hf_experts import unstack

    sd = dict(unstack(model.state_dict().items()))
    merged = merge_lora(sd, adapter_dir)
    with torch.no_grad():
        for key, w in merged.items():
            if w is not sd[key]:
                sd[key].copy_(w)
    return model
