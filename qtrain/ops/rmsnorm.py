"""RMSNorm, computed in float32 and cast back, exactly as Hugging Face's Qwen3RMSNorm.

The reference runs everywhere (and is what the CPU always uses); on CUDA Liger-Kernel's Triton
kernel (casting mode "llama": the same fp32 statistics, cast before the weight multiply) saves the
fp32 copy of the input that autograd would keep; on Ascend, torch_npu's fused kernel. See dispatch.py.
"""

import torch

from qtrain.ops import dispatch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalize(x) over the last dim; output dtype as the reference's (promoted with weight)."""
    path = dispatch.impl("rms_norm", x.device)
    # Mixed dtypes (autocast with an fp32 weight) or DTensors (tensor parallel): the reference.
    fusable = x.dtype == weight.dtype and dispatch.plain(x, weight)
    if path == "liger" and fusable:
        return dispatch.liger().LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)
    if path == "npu" and fusable:
        return dispatch.npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    return rms_norm_reference(x, weight, eps)
