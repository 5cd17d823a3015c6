"""Write a `Source` (see sources.py) as an HF dir, tensor by tensor.

The other targets: megatron.py (`save_megatron`) and dcp_export.py (`save_qtrain`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from qtrain.checkpoint.sources import Source
from qtrain.io_utils import write_json_atomic
from qtrain.models.hf import copy_tokenizer, generation_config, write_safetensors_sharded

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
HF_SHARD_BYTES = 10**9  # smaller than HF's 5 GB: the writer holds a shard (and a bytes copy of it) in memory


def hf_config_for(source: Source, dtype: torch.dtype | None) -> dict[str, Any]:
    """The source's own config.json when it has one (so unknown fields survive), else one built
    from its Qwen3Config; `torch_dtype` names the dtype the weights are written in."""
    d = dict(source.hf_config) if source.hf_config else source.config.to_hf_dict()
    if dtype is not None:  # transformers 5 writes "dtype", earlier versions "torch_dtype": keep the source's
        key = "dtype" if "dtype" in d and "torch_dtype" not in d else "torch_dtype"
        d[key] = DTYPE_NAMES.get(dtype, d.get(key))
    return d


def save_hf_dir(source: Source, out_dir: str | Path, dtype: torch.dtype | None = None,
                generation_config_dir: Path | None = None, max_shard_bytes: int = HF_SHARD_BYTES) -> Path:
    """config.json, generation_config.json, sharded safetensors and the tokenizer files (if the
    source has them). Weights first, config.json last, so a dir with a config is complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # an earlier model there no longer looks complete

    def tensors():
        for name in source.names():
            t = source.get(name)
            yield name, t if dtype is None else t.to(dtype)

    write_safetensors_sharded(tensors(), out, max_shard_bytes)
    if source.tokenizer_dir is not None:
        copy_tokenizer(source.tokenizer_dir, out)
    gen = generation_config_dir / "generation_config.json" if generation_config_dir else None
    if gen is not None and gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    else:
        write_json_atomic(out / "generation_config.json", generation_config(source.config))
    write_json_atomic(out / "config.json", hf_config_for(source, dtype))
    return out
