"""Hugging Face checkpoints: read and write config.json + safetensors, tensor by tensor.

Loading streams each tensor from the (memory-mapped) safetensors file straight into the
parameter it belongs to, so the weights are never held twice; saving writes shards of at most
5 GB with an index, as `save_pretrained` does, so transformers and vLLM-style loaders accept it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qtrain.errors import CheckpointError
from qtrain.io_utils import atomic_path, follow_umask, write_json_atomic
from qtrain.models.config import Qwen3Config
from qtrain.models.hf_experts import ExpertStacker, unstack
from qtrain.models.qwen3 import Qwen3ForCausalLM, build_model

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 10**9

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _require_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model dir with config.json)")
    return path


def read_hf_config(path: str | Path) -> Qwen3Config:
    """The Qwen3Config of an HF model dir; errors name the file for a missing or non-Qwen3 config."""
    path = _require_dir(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; is this a Hugging Face model directory?")
    return Qwen3Config.from_json(path / "config.json")


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of an HF dir: from the index when sharded, else model.safetensors."""
    path = _require_dir(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(map(str, weight_map.values())))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); re-export the "
                                  f"model or remove the file") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but missing: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no *.safetensors weights (and no {INDEX_NAME})")
    return found


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of an HF dir, one at a time, each read from a memory map."""
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it is damaged or truncated: "
                                  f"download or export it again") from None


def iter_model_tensors(path: str | Path, cfg: Qwen3Config,
                       dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, tensor) for every tensor of an HF dir: per-expert Qwen3-MoE tensors gathered
    into their stacked parameter (in `dtype`), handed on when its last expert is read. Raises
    CheckpointError naming the per-expert tensors of a stack that never completes."""
    if not cfg.is_moe:
        yield from iter_safetensors(path)
        return
    stacker = ExpertStacker(cfg.num_experts, dtype)
    for name, tensor in iter_safetensors(path):
        yield from stacker.add(name, tensor)
    if stacker.missing():
        missing = stacker.missing()
        raise CheckpointError(f"{path}: expert tensors missing: {', '.join(missing[:10])}"
                              f"{' ...' if len(missing) > 10 else ''}")


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> Qwen3ForCausalLM:
    """Load an HF Qwen3 checkpoint dir into a qtrain model (built on meta, filled tensor by tensor)."""
    path = Path(path)
    cfg = read_hf_config(path)
    model = build_model(cfg, "meta")
    expected = dict(model.state_dict(keep_vars=True))
    tied = cfg.tie_word_embeddings
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in iter_model_tensors(path, cfg, dtype):
        if tied and name == "lm_head.weight":
            continue  # the embedding is the LM head; HF ignores this copy too
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {want}")
        _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(set(expected) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        raise CheckpointError(f"{path}: weights do not match config.json ({'; '.join(parts)})")
    model.tie_weights()
    return model


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors HF stores: the state dict without the tied LM head copy, Qwen3-MoE experts
    under their per-expert names (views into the stacked parameters)."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return dict(unstack(sd.items()))


def write_safetensors_sharded(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                              max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write tensors as `model-0000i-of-0000n.safetensors` shards (<= max_shard_bytes each, one
    tensor may exceed it alone) plus the index, or a single `model.safetensors` when one shard fits.

    Holds at most one shard in memory; each file is written atomically, the index last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []
    tmp_files: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            tmp = out_dir / f".shard-{len(shards):05d}.tmp"
            save_file(current, str(tmp), metadata={"format": "pt"})
            follow_umask(tmp)  # safetensors creates its files 0600
            shards.append(list(current))
            tmp_files.append(tmp)
            current, size = {}, 0

    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        tmp_files[0].replace(out_dir / SINGLE_NAME)
        (out_dir / INDEX_NAME).unlink(missing_ok=True)
        _remove_other_shards(out_dir, [])
        return [SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for tmp, file_name, keys in zip(tmp_files, names, shards):
        tmp.replace(out_dir / file_name)
        weight_map.update({k: file_name for k in keys})
    (out_dir / SINGLE_NAME).unlink(missing_ok=True)
    write_json_atomic(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _remove_other_shards(out_dir, names)
    return names


def _remove_other_shards(out_dir: Path, keep: list[str]) -> None:
    """Shards of a model written here before with another shard count (no index names them now)."""
    for path in out_dir.glob("model-?????-of-?????.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def generation_config(cfg: Qwen3Config) -> dict:
    eos = cfg.eos_token_id
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.bos_token_id,
            "do_sample": False, "transformers_version": "4.51.0"}


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> list[str]:
    tokenizer_dir = Path(tokenizer_dir)
    copied = []
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            with atomic_path(Path(out_dir) / name) as tmp:
                shutil.copyfile(src, tmp)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json or vocab.json) to copy")
    return copied


def save_hf(model: Qwen3ForCausalLM, path: str | Path, tokenizer_dir: str | Path | None = None,
            dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write an HF model dir: config.json, generation_config.json, safetensors (+ index), tokenizer.

    `dtype` converts tensors on the way out (default: as they are). Weights first, config last, so
    a directory with a config.json is complete.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)  # an earlier export there no longer looks complete
    sd = hf_state_dict(model)
    out_dtype = dtype or next(iter(sd.values())).dtype
    write_safetensors_sharded(((k, v.to(out_dtype)) for k, v in sd.items()), path, max_shard_bytes)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)
    cfg: Qwen3Config = model.config
    write_json_atomic(path / "generation_config.json", generation_config(cfg))
    write_json_atomic(path / "config.json", cfg.to_hf_dict(_DTYPE_NAMES.get(out_dtype, "bfloat16")))
    return path
