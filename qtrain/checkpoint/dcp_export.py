"""Write a `Source` (see sources.py) as an optimizer-free qtrain checkpoint (torch.distributed.checkpoint).

Kept apart from the HF and Megatron writers so that those do not import DCP (seconds of start-up).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

from qtrain.checkpoint.layout import iteration_dir_name, swap_into_place, write_tracker
from qtrain.checkpoint.sources import Source
from qtrain.checkpoint.writers import hf_config_for
from qtrain.errors import CheckpointError
from qtrain.io_utils import write_json_atomic
from qtrain.models.config import Qwen3Config
from qtrain.models.hf import copy_tokenizer


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
    if cfg.is_moe:  # the model's own names: Qwen3-MoE experts stacked, read stacked from the source
        from qtrain.models.qwen3 import build_model

        shapes = {n: tuple(t.shape) for n, t in build_model(cfg, "meta").state_dict().items()}
        names = list(shapes)
    else:
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
