"""A restricted unpickler for Megatron rank files: tensors, `args` and RNG state, nothing that runs code.

torch's own `weights_only=True` loader would do, but it rejects pickle protocol 4, which
MindSpeed-LLM's converter uses (`torch.save(..., pickle_protocol=4)`). This module is passed as
`torch.load(pickle_module=...)`: it resolves only an allowlist of globals; classes from Megatron or
MindSpeed packages (enums in `args`, say) become inert placeholders, so the file loads even where
those packages are not installed. Anything else is refused with its name.

Every allowed global is a plain container or value type, or torch's tensor rebuilders: calling
one (as the pickle's REDUCE does, or a defaultdict's default_factory later) builds data and runs
no other code. MindSpeed-LLM's convert_ckpt_v2 stores each model as `defaultdict(dict)`; a
defaultdict's factory is itself a global, so one naming anything outside this list is refused.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

_ALLOWED = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("argparse", "Namespace"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray"), ("_codecs", "encode"),
    ("_io", "BytesIO"),  # Transformer Engine's `_extra_state` (fp8 metadata), dropped by the reader
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "Size"), ("torch", "device"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
_OPAQUE_PACKAGES = ("megatron", "mindspeed", "mindspeed_llm")


class Opaque:
    """Stands in for a Megatron/MindSpeed object in `args` (an enum, a config): keeps its data, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or module == "numpy.dtypes":
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _OPAQUE_PACKAGES:
            return type(name, (Opaque,), {"__module__": module})
        raise pickle.UnpicklingError(f"global {module}.{name} is not on qtrain's allowlist")


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


__all__ = ["Unpickler", "load"]
