"""SwiGLU activation: silu(gate) * up.

On CUDA Liger-Kernel's kernel keeps only gate and up for the backward (the reference also keeps
silu(gate)); on Ascend torch_npu's npu_swiglu, which takes [gate, up] concatenated. See dispatch.py.
"""

import torch
import torch.nn.functional as F

from qtrain.ops import dispatch


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    path = dispatch.impl("swiglu", gate.device)
    fusable = gate.dtype == up.dtype and dispatch.plain(gate, up)
    if path == "liger" and fusable:
        return dispatch.liger().LigerSiLUMulFunction.apply(gate, up)
    if path == "npu" and fusable:
        return dispatch.npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
    return swiglu_reference(gate, up)
