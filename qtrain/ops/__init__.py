"""Fused ops behind one function each (rmsnorm, rope, swiglu, linear cross-entropy, attention).

Each op has a PyTorch reference (CPU, tests) and, chosen per device type, a fused path: Liger-Kernel
on CUDA, torch_npu on Ascend. `backend()` reports the choice; QTRAIN_OPS=reference forces the
reference (see qtrain/ops/dispatch.py).
"""

from qtrain.ops.dispatch import backend, configure, using

__all__ = ["backend", "configure", "using"]
