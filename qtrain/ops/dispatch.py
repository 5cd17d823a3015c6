"""Which implementation each fused op runs: the PyTorch reference, Liger-Kernel (CUDA) or torch_npu (Ascend).

The choice is made per device type, once, when this module is imported (or `configure()` is
called), and looked up per call from the input tensor's device: CPU tensors always take the
reference path, so the choice never changes CPU results. Under torch.compile the lookup is a
plain dict read, which dynamo guards on without a graph break.

QTRAIN_OPS selects explicitly:
  auto (default)   fused where available: Liger on CUDA if importable, torch_npu on NPU, else reference;
                   inside torch.compile'd code the element-wise ops (rms_norm, rope, swiglu) take the
                   reference, which inductor fuses with its neighbours (an opaque kernel would stop that)
  reference        the PyTorch reference everywhere (torch.compile fuses it when compile is on)
  liger | npu      that library for every op it has, on its device (an error if it is missing there)
  op=impl,...      per op, e.g. "rope=reference,swiglu=reference"; unnamed ops stay on auto
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

ENV = "QTRAIN_OPS"
OPS = ("rms_norm", "rope", "swiglu", "linear_cross_entropy")
IMPLS = ("reference", "liger", "npu")
_NATIVE = {"cuda": "liger", "npu": "npu"}  # the fused library of each device type
_ELEMENTWISE = ("rms_norm", "rope", "swiglu")  # what inductor fuses as well as a library kernel
# torch_npu has no drop-in fused linear cross-entropy: Ascend runs the chunked reference (see
# linear_cross_entropy.py; op-plugin's newer fused_linear_online_max_sum family is unverified here)
_SUPPORTED = {"liger": OPS, "npu": _ELEMENTWISE}

log = logging.getLogger("qtrain.ops")

# device type -> op -> implementation, in eager code and inside torch.compile'd code;
# device types absent here use the reference.
_TABLE: dict[str, dict[str, str]] = {}
_COMPILED_TABLE: dict[str, dict[str, str]] = {}
_LIGER: Optional[ModuleType] = None  # liger_kernel.ops once imported
_NPU: Optional[ModuleType] = None  # torch_npu once imported
_SPEC: str = "auto"


def parse_spec(spec: str) -> dict[str, str]:
    """QTRAIN_OPS text -> {op: impl} for the ops it names ("auto" names none)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        return {}
    if spec in IMPLS:
        return dict.fromkeys(OPS, spec)
    out = {}
    for part in spec.split(","):
        op, sep, impl = part.strip().partition("=")
        if not sep or op not in OPS or impl not in IMPLS + ("auto",):
            raise ValueError(
                f"{ENV}={spec!r}: cannot read {part.strip()!r}; use 'auto', 'reference', 'liger', 'npu' or a comma "
                f"list of op=impl with op in {', '.join(OPS)} and impl in {', '.join(IMPLS + ('auto',))}")
        if impl != "auto":
            out[op] = impl
    return out


def resolve(device_type: str, requested: dict[str, str], available: dict[str, bool]) -> dict[str, str]:
    """The implementation of each op on `device_type`.

    requested: from parse_spec; available: {"liger": bool, "npu": bool} on this machine.
    A library only ever runs on its own device type (Liger on CUDA, torch_npu on NPU), so CPU is
    always the reference. An explicit request for a library that is missing raises ValueError
    (never a silent fallback); "auto" falls back to the reference.
    """
    native = _NATIVE.get(device_type)
    table = {}
    for op in OPS:
        want = requested.get(op)
        if want is None:
            table[op] = native if native and available.get(native) and op in _SUPPORTED[native] else "reference"
        elif want != native or op not in _SUPPORTED[want]:
            table[op] = "reference"  # "reference", or another device type's library
        elif not available.get(want):
            raise ValueError(f"{ENV} asks for {want} for {op} on {device_type}, but it is not importable here "
                             f"({'pip install liger-kernel (needs triton)' if want == 'liger' else 'install torch_npu'}); "
                             f"set {ENV}=auto or {ENV}=reference")
        else:
            table[op] = want
    return table


def _import_liger() -> Optional[ModuleType]:
    """liger_kernel.ops when CUDA and Liger (with Triton) import cleanly, else None."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        import liger_kernel.ops as liger_ops
    except Exception as e:  # a broken install (e.g. Triton mismatch) must not stop training
        log.warning("liger-kernel is installed but failed to import (%s); using reference ops on CUDA", e)
        return None
    return liger_ops


def _import_npu() -> Optional[ModuleType]:
    from qtrain.device import npu_available

    if not npu_available():
        return None
    import torch_npu

    return torch_npu


def _present() -> list[str]:
    """Device types this process can use (the CPU always)."""
    present = ["cpu"]
    if torch.cuda.is_available():
        present.append("cuda")
    if _NPU is not None:
        present.append("npu")
    return present


def configure(spec: Optional[str] = None) -> dict[str, dict[str, str]]:
    """(Re)build the table from `spec` (default: $QTRAIN_OPS or "auto") and log the choice once.

    Call it outside torch.compile'd code; returns the new table.
    """
    global _LIGER, _NPU, _SPEC
    spec = spec if spec is not None else os.environ.get(ENV, "auto")
    requested = parse_spec(spec)
    if _LIGER is None:
        _LIGER = _import_liger()
    if _NPU is None:
        _NPU = _import_npu()
    available = {"liger": _LIGER is not None, "npu": _NPU is not None}
    table = {dev: resolve(dev, requested, available) for dev in _present()}
    compiled = {dev: {op: "reference" if op in _ELEMENTWISE and op not in requested else impl
                      for op, impl in choice.items()} for dev, choice in table.items()}
    _TABLE.clear()
    _TABLE.update(table)
    _COMPILED_TABLE.clear()
    _COMPILED_TABLE.update(compiled)
    _SPEC = spec
    for dev, choice in table.items():
        log.log(logging.DEBUG if dev == "cpu" else logging.INFO, "qtrain ops on %s (%s=%s): %s; under torch.compile: %s",
                dev, ENV, spec, ", ".join(f"{op}={impl}" for op, impl in choice.items()),
                ", ".join(f"{op}={impl}" for op, impl in compiled[dev].items()))
    return {d: dict(t) for d, t in table.items()}


def impl(op: str, device: torch.device) -> str:
    """The implementation `op` uses for tensors on `device` (here, eager or compiled)."""
    table = (_COMPILED_TABLE if torch.compiler.is_compiling() else _TABLE).get(device.type)
    return table[op] if table is not None else "reference"


def plain(*tensors: torch.Tensor) -> bool:
    """True when no argument is a DTensor: the fused kernels take local tensors only (under tensor
    parallel the reference runs on DTensors)."""
    from torch.distributed.tensor import DTensor

    return not any(isinstance(t, DTensor) for t in tensors)


def liger() -> ModuleType:
    assert _LIGER is not None, "liger path chosen without liger_kernel"
    return _LIGER


def npu() -> ModuleType:
    assert _NPU is not None, "npu path chosen without torch_npu"
    return _NPU


def backend(device_type: Optional[str] = None, compiled: bool = False) -> dict[str, str]:
    """{op: implementation} on `device_type` (default: this machine's accelerator, else "cpu"), in
    eager code or (compiled=True) inside torch.compile'd code."""
    if device_type is None:
        from qtrain.device import device_type as current

        device_type = current()
    table = _COMPILED_TABLE if compiled else _TABLE
    return dict(table.get(device_type) or dict.fromkeys(OPS, "reference"))


@contextlib.contextmanager
def using(spec: str) -> Iterator[dict[str, dict[str, str]]]:
    """Run the block with QTRAIN_OPS-style `spec`, then restore the previous choice (tests, benchmarks)."""
    previous = _SPEC
    try:
        yield configure(spec)
    finally:
        configure(previous)


configure()


# The grouped expert matmul of mixture-of-experts layers (qtrain/ops/moe.py) has no Liger kernel:
# on CUDA it is torch's own torch._grouped_mm, on Ascend torch_npu's npu_grouped_matmul, on the
# CPU (and with QTRAIN_OPS=reference) the reference. It sits outside OPS for that reason.
def grouped_mm_impl(device: torch.device) -> str:
    """"torch", "npu" or "reference": how qtrain.ops.moe.grouped_mm runs on `device`."""
    if _SPEC.strip() == "reference":
        return "reference"
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        return "torch"
    if device.type == "npu" and _NPU is not None:
        return "npu"
    return "reference"
