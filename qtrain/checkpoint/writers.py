"""Write a `Source` (see sources.py) as an HF dir or a qtrain (DCP) checkpoint, tensor by tensor.

Megatron output lives in megatron.py (`save_megatron`); these are the other two targets.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

from qtrain.checkpoint.layout import iteration_dir_name, swap_into_place, write_tracker
from qtrain.checkpoint.sources import Source
from qtrain.errors import CheckpointError
from qtrain.io_utils import write_json_atomic
from qtrain.models.config import Qwen3Config
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


class _StreamingPlanner(DefaultSavePlanner):
    """Plans with meta tensors and fetches each real tensor only when DCP writes it."""

    def __init__(self, fetch):
        super().__init__()
        self._fetch = fetch

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self._fetch(write_item.index.fqn.removeprefix("model."))


def save_qtrain(source: Source, save_dir: str | Path, iteration: int, dtype: torch.dtype | None = None) -> Path:
    """An optimizer-free qtrain checkpoint: {"model": {HF name: fp32 tensor}} in DCP, config.json
    (and the tokenizer files when the source has them), then the tracker. Tied models also store
    `lm_head.weight`, as the live model's state dict does.

    Each tensor goes to its own DCP file, so only one tensor is in memory at a time.
    """
    cfg = source.config
    names = source.names()
    if cfg.tie_word_embeddings:
        names = names + ["lm_head.weight"]
    alias = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}
    shapes = _shapes(cfg, names)
    state = {"model": {n: torch.empty(shapes[n], dtype=torch.float32, device="meta") for n in names}}
    final = Path(save_dir) / iteration_dir_name(iteration)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def fetch(name: str) -> torch.Tensor:
        tensor = source.get(alias.get(name, name))
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} in the source, its config implies "
                                  f"{shapes[name]}")
        return tensor.to(torch.float32)

    with warnings.catch_warnings():  # single-process save is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1),
                 planner=_StreamingPlanner(fetch), no_dist=True)
    if source.tokenizer_dir is not None:  # so that a later export to HF is complete
        copy_tokenizer(source.tokenizer_dir, tmp)
    write_json_atomic(tmp / "config.json", hf_config_for(source, dtype))
    swap_into_place(tmp, final)
    write_tracker(save_dir, iteration)
    return final


def _shapes(c: Qwen3Config, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the config (no tensor data is read)."""
    h, q, kv, f = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    by_suffix = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (c.head_dim,),
        "self_attn.k_norm.weight": (c.head_dim,), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "lm_head.weight": (c.vocab_size, h),
              "model.norm.weight": (h,)}
    return {n: shapes[n] if n in shapes else by_suffix[n.split(".", 3)[3]] for n in names}
