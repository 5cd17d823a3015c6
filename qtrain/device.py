"""CUDA / Ascend NPU / CPU behind one small interface: which device, which backend, sync, memory, peak FLOP/s."""

from __future__ import annotations

import importlib.util
import os

import torch

# Dense bf16 peak FLOP/s by device name fragment (datasheet figures; MFU is reported against these).
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "4090": 165e12, "B200": 2250e12, "GB200": 2500e12,
    "Ascend910B": 313e12, "Ascend910_93": 376e12,
}

_NPU_CHECKED = False


def npu_available() -> bool:
    """True when torch_npu is installed and sees a device (imports it once, registering 'npu')."""
    global _NPU_CHECKED
    if importlib.util.find_spec("torch_npu") is None:
        return False
    if not _NPU_CHECKED:
        import torch_npu  # noqa: F401  (registers the npu device type with torch)
        _NPU_CHECKED = True
    return hasattr(torch, "npu") and torch.npu.is_available()


def device_type() -> str:
    """'cuda', 'npu' or 'cpu' (QTRAIN_DEVICE overrides, e.g. to force CPU on a GPU machine)."""
    forced = os.environ.get("QTRAIN_DEVICE")
    if forced:
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"


def dist_backend(dev_type: str | None = None) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(dev_type or device_type(), "gloo")


def local_device(local_rank: int = 0, dev_type: str | None = None) -> torch.device:
    dev_type = dev_type or device_type()
    if dev_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, dev_type)
    module.set_device(local_rank)
    return torch.device(dev_type, local_rank)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    return getattr(torch, device.type).get_device_name(device)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the device, or None when unknown (CPU): MFU is then not reported."""
    name = device_name(device).replace(" ", "")
    for key, flops in PEAK_BF16_FLOPS.items():
        if key.replace(" ", "") in name:
            return flops
    return None


def max_memory_allocated(device: torch.device) -> int:
    """Peak bytes allocated on the device since the last reset (0 on CPU)."""
    if device.type == "cpu":
        return 0
    return getattr(torch, device.type).max_memory_allocated(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).reset_peak_memory_stats(device)
