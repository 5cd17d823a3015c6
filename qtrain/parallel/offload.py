"""Memory off the device: optimizer state and activations in host memory.

- `--optimizer-cpu-offload` (MindSpeed-LLM: `--swap-optimizer`): FSDP2's CPUOffloadPolicy. Each
  rank's fp32 master-weight shards, their gradients and so AdamW's state live in pinned host
  memory and the optimizer step runs on the host; FSDP copies a unit's shards to the device just
  before it all-gathers them, and moves its reduce-scattered gradients back. The device keeps
  only the gathered (bf16) units in use and the activations. Collectives on host tensors (the
  gradient norm) need a host backend: the process group is then `cpu:gloo,<device>:<backend>`.
- `--cpu-offloading --cpu-offloading-num-layers N` (Megatron): the tensors the first N decoder
  layers save for the backward are copied to pinned host memory as the forward makes them and
  brought back when the backward needs them (autograd's saved-tensor hooks, as
  torch.autograd.graph.save_on_cpu, but leaving parameters, which FSDP holds anyway, in place).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
from torch.distributed.tensor import DTensor


def offload_policy(enabled: bool, device_type: str) -> OffloadPolicy:
    """FSDP2's policy: CPUOffloadPolicy (pinned when there is an accelerator) or none."""
    return CPUOffloadPolicy(pin_memory=device_type != "cpu") if enabled else OffloadPolicy()


def optimizer_offloaded(model: nn.Module) -> bool:
    """True when every FSDP unit of `model` that holds parameters keeps them (and so the
    gradients and optimizer state) in host memory."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [g for g in groups if g is not None]
    return bool(groups) and all(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups)


def host_collectives_backend(backend: str, device_type: str) -> str:
    """The process-group backend with a host (gloo) side for host tensors: `cpu:gloo,cuda:nccl`."""
    return backend if device_type == "cpu" else f"cpu:gloo,{device_type}:{backend}"


def _pack(t: torch.Tensor):
    # Parameters stay (FSDP holds them anyway); a DTensor (TP's autograd at the DTensor level) too,
    # rather than rebuilding its placements: the activations are the plain local tensors.
    if isinstance(t, (nn.Parameter, DTensor)):
        return t
    host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, device="cpu",
                       pin_memory=t.device.type != "cpu")
    host.copy_(t, non_blocking=True)
    return t.device, host


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


def _offloaded_forward(forward, *args, **kwargs):
    # Look the hooks up at call time (tests count the packs).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _pack(t), lambda p: _unpack(p)):
        return forward(*args, **kwargs)


def apply_activation_offload(model: nn.Module, num_layers: int) -> list[int]:
    """Keep the saved activations of the first `num_layers` decoder layers of `model` (a model or
    pipeline chunk) in host memory; returns their positions. Parameter names do not change."""
    layers = list(model.model.layers.values())[:num_layers]
    for layer in layers:
        layer.forward = functools.partial(_offloaded_forward, layer.forward)
    return list(range(len(layers)))
