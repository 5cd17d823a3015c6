"""Qwen3-MoE expert weights between the model's stacked parameters and the per-expert tensors of
HF checkpoint files.

In the model (and transformers 5 in memory) a sparse layer's experts are two stacked parameters:
`model.layers.N.mlp.experts.gate_up_proj` [E, 2*I, H] (expert e's gate rows, then its up rows)
and `...experts.down_proj` [E, H, I]. Released checkpoints, and transformers 5.24's
save_pretrained, store one tensor per expert and projection:
`model.layers.N.mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I].
qtrain writes the per-expert names (older transformers and vLLM read those) and reads both.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from qtrain.errors import CheckpointError

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def per_expert_names(experts_prefix: str, num_experts: int) -> list[str]:
    """`<prefix>.{e}.gate_proj.weight`, `up_proj`, `down_proj` for every expert, in expert order."""
    return [f"{experts_prefix}.{e}.{proj}.weight" for e in range(num_experts)
            for proj in ("gate_proj", "up_proj", "down_proj")]


def is_stacked(name: str) -> bool:
    return _STACKED.match(name) is not None


def file_names_of(model_name: str, num_experts: int) -> list[str]:
    """The per-expert file names a model parameter is stored as (itself if it is not stacked)."""
    m = _STACKED.match(model_name)
    if m is None:
        return [model_name]
    projs = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
    return [f"{m.group(1)}.{e}.{p}.weight" for e in range(num_experts) for p in projs]


def expert_slice(stacked: torch.Tensor, file_name: str) -> torch.Tensor:
    """One expert's projection (a view) out of its stacked parameter."""
    m = _PER_EXPERT.match(file_name)
    assert m is not None, file_name
    e, proj = int(m.group(2)), m.group(3)
    if proj == "down_proj":
        return stacked[e]
    half = stacked.shape[1] // 2
    return stacked[e, :half] if proj == "gate_proj" else stacked[e, half:]


def stacked_name_of(file_name: str) -> str | None:
    """The model parameter a per-expert file tensor belongs to, or None if it is not one."""
    m = _PER_EXPERT.match(file_name)
    if m is None:
        return None
    return f"{m.group(1)}.{'down_proj' if m.group(3) == 'down_proj' else 'gate_up_proj'}"


def unstack(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Model-named tensors -> file-named tensors: each stacked expert parameter as its per-expert
    views, everything else as it is."""
    for name, tensor in named:
        if is_stacked(name):
            for file_name in file_names_of(name, tensor.shape[0]):
                yield file_name, expert_slice(tensor, file_name)
        else:
            yield name, tensor


class ExpertStacker:
    """File-named tensors in, model-named tensors out: per-expert tensors are gathered into their
    stacked parameter, which is handed on once every expert has arrived. At most the stacked
    tensors whose experts are still arriving are held (in a safetensors file ordered by name,
    the two of one layer)."""

    def __init__(self, num_experts: int, dtype: torch.dtype | None = None):
        self.num_experts, self.dtype = num_experts, dtype
        self._buffers: dict[str, torch.Tensor] = {}
        self._seen: dict[str, set[str]] = {}

    def add(self, file_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The (model name, full tensor) pairs this tensor completes ([] while a stack is partial)."""
        target = stacked_name_of(file_name)
        if target is None:
            return [(file_name, tensor)]
        m = _PER_EXPERT.match(file_name)
        if int(m.group(2)) >= self.num_experts:
            raise CheckpointError(f"{file_name}: expert {m.group(2)} but config.json has num_experts "
                                  f"{self.num_experts}")
        buf = self._buffers.get(target)
        if buf is None:
            rows, cols = tensor.shape
            shape = (self.num_experts, 2 * rows, cols) if target.endswith("gate_up_proj") else (self.num_experts, rows, cols)
            buf = self._buffers[target] = torch.empty(shape, dtype=self.dtype or tensor.dtype)
            self._seen[target] = set()
        view = expert_slice(buf, file_name)
        if tuple(view.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {file_name} has shape {tuple(tensor.shape)}, its other experts "
                                  f"{tuple(view.shape)}")
        view.copy_(tensor)
        self._seen[target].add(file_name)
        if len(self._seen[target]) < len(file_names_of(target, self.num_experts)):
            return []
        del self._seen[target]
        return [(target, self._buffers.pop(target))]

    def missing(self) -> list[str]:
        """Per-expert tensors of partly read stacks that never arrived."""
        return sorted(n for target, seen in self._seen.items()
                      for n in file_names_of(target, self.num_experts) if n not in seen)
