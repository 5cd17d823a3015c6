"""Random access to the HF-named tensors of a checkpoint in any of the three formats.

A source gives `config` (Qwen3Config), `hf_config` (the config.json dict to pass on, or None),
`iteration`, `tokenizer_dir`, `names()` in HF file order and `get(name)` -> full tensor. Every
`get` reads just that tensor, so a converter holds one tensor (or one output file) at a time.

Qwen3-MoE experts: `names()` lists them under the per-expert names of released HF checkpoints
(`model.layers.N.mlp.experts.{e}.gate_proj.weight`, ...), whatever the format stores (qtrain and
transformers 5 in memory: stacked `experts.gate_up_proj` / `down_proj`), so conversion code is
written against HF file names; `get` also takes the stacked model names (qtrain.models.hf_experts).
Safetensors are read with plain file reads rather than a memory map: mapped pages would count
in the process's resident memory until the whole file is unmapped.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch

from qtrain.checkpoint.layout import iteration_dir_name, resolve_iteration
from qtrain.checkpoint.megatron import MegatronReader, RopeThetaWarning
from qtrain.checkpoint.megatron_map import hf_param_names
from qtrain.errors import CheckpointError
from qtrain.models.config import Qwen3Config
from qtrain.models.hf import TOKENIZER_FILES, read_hf_config, safetensors_files
from qtrain.models.hf_experts import expert_slice, file_names_of, is_stacked, stacked_name_of

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Source(Protocol):
    config: Qwen3Config
    hf_config: dict[str, Any] | None
    iteration: int | str | None
    tokenizer_dir: Path | None

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


def _has_tokenizer(path: Path) -> Path | None:
    return path if any((path / f).is_file() for f in TOKENIZER_FILES) else None


def config_dtype(hf_config: dict[str, Any] | None) -> torch.dtype | None:
    """The dtype a config.json declares (`torch_dtype` or transformers 5's `dtype`), if known."""
    if not hf_config:
        return None
    return _DTYPE_NAMES.get(hf_config.get("torch_dtype") or hf_config.get("dtype"))


def _safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, the JSON header) of a safetensors file; CheckpointError naming the file if it
    is damaged."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > file.stat().st_size:
                raise ValueError(f"header of {n} bytes in a file of {file.stat().st_size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for name, meta in header.items():
            if name != "__metadata__":
                begin, end = meta["data_offsets"]
                if not 0 <= begin <= end or 8 + n + end > file.stat().st_size:
                    raise ValueError(f"tensor {name} lies outside the file")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e}); it is damaged "
                              f"or truncated: download or export it again") from None
    return n, header


class _ExpertNames:
    """`get` by per-expert file name from a store of stacked experts and by stacked model name
    from a store of per-expert tensors; everything else as the store has it. The last stacked
    tensor read is kept, so reading its experts one by one reads it once."""

    def __init__(self, raw_names, raw_get, num_experts: int):
        self._raw_names, self._raw_get, self._num_experts = raw_names, raw_get, num_experts
        self._cached: tuple[str, torch.Tensor] | None = None

    def covered(self) -> set[str]:
        """Every name `get` can answer."""
        have = set(self._raw_names)
        for name in list(have):
            if is_stacked(name):
                have.update(file_names_of(name, self._num_experts))
        return have

    def get(self, name: str) -> torch.Tensor:
        if name in self._raw_names:
            return self._raw_get(name)
        stacked = stacked_name_of(name)
        if stacked is not None and stacked in self._raw_names:
            if self._cached is None or self._cached[0] != stacked:
                self._cached = (stacked, self._raw_get(stacked))
            return expert_slice(self._cached[1], name).clone()
        if is_stacked(name):
            parts = [self._raw_get(n) for n in file_names_of(name, self._num_experts)]
            per_expert = len(parts) // self._num_experts  # gate and up, or down
            return torch.stack([torch.cat(parts[e * per_expert:(e + 1) * per_expert])
                                for e in range(self._num_experts)])
        raise KeyError(name)


def _check_complete(where: str, have: set[str], cfg: Qwen3Config) -> None:
    missing = [n for n in hf_param_names(cfg) if n not in have]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{where}: tensors missing for the model its config describes: "
                              f"{', '.join(missing[:5])}{more}")


class HFSource:
    """An HF model dir: config.json + safetensors (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_hf_config(self.path)
        self.hf_config = json.loads((self.path / "config.json").read_text())
        self.iteration = None
        self.tokenizer_dir = _has_tokenizer(self.path)
        self._index: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for file in safetensors_files(self.path):
            n, header = _safetensors_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                begin, end = meta["data_offsets"]
                self._index[name] = (file, _ST_DTYPES[meta["dtype"]], meta["shape"], 8 + n + begin, end - begin)
        self._experts = _ExpertNames(self._index, self._read, self.config.num_experts)
        _check_complete(str(self.path), self._experts.covered(), self.config)

    def names(self) -> list[str]:
        return hf_param_names(self.config)

    def get(self, name: str) -> torch.Tensor:
        return self._experts.get(name)

    def _read(self, name: str) -> torch.Tensor:
        file, dtype, shape, offset, nbytes = self._index[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            while done < nbytes:  # one read() returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{file}: truncated while reading tensor {name}")
                done += got
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        pass


class QtrainSource:
    """The "model" part of a qtrain (DCP) checkpoint, read tensor by tensor without a process group."""

    def __init__(self, path: str | Path, iteration: int | None = None):
        root = Path(path)
        if (root / ".metadata").is_file():  # pointed straight at an iter_XXXXXXX folder
            self.folder, self.iteration = root, None
        else:
            self.iteration = resolve_iteration(root, iteration)
            self.folder = root / iteration_dir_name(self.iteration)
        if not (self.folder / ".metadata").is_file():
            raise CheckpointError(f"{self.folder}: no DCP .metadata; not a qtrain checkpoint (or incomplete)")
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing; a qtrain checkpoint stores its model config there")
        self.hf_config = json.loads(config_file.read_text())
        self.config = Qwen3Config.from_hf_dict(self.hf_config, source=str(config_file))
        self.tokenizer_dir = _has_tokenizer(self.folder)
        from qtrain.checkpoint import dcp_safe  # only here: importing DCP costs seconds

        self._dcp_safe = dcp_safe
        meta = dcp_safe.read_metadata(self.folder).state_dict_metadata
        self._meta = {k[len("model."):]: v for k, v in meta.items() if k.startswith("model.")}
        # A LoRA run's checkpoint holds base weights and adapters: every reader gets them merged
        # (W + B A alpha / r, with alpha / r from the adapter written beside them), never the bare base:
        # linear layers' `<module>.lora_A.weight` / `.lora_B.weight`, and Qwen3-MoE's per-expert pairs on
        # a stacked weight, `<experts>.<proj>_lora.lora_A` [E, r, in] / `.lora_B` [E, out, r].
        self._linear_lora = {k.removesuffix(".lora_A.weight") for k in self._meta if k.endswith(".lora_A.weight")}
        self._expert_lora = {k.removesuffix("_lora.lora_A") for k in self._meta if k.endswith("_lora.lora_A")}
        self.lora_modules = sorted(self._linear_lora | self._expert_lora)
        if self.lora_modules:
            from qtrain.checkpoint.adapter import read_adapter_config

            self._lora_scaling = read_adapter_config(self.folder / "adapter").scaling
        self._experts = _ExpertNames(self._meta, self._read_merged, self.config.num_experts)
        _check_complete(str(self.folder), self._experts.covered(), self.config)

    def names(self) -> list[str]:
        return hf_param_names(self.config)

    def get(self, name: str) -> torch.Tensor:
        return self._experts.get(name)

    def _read_merged(self, name: str) -> torch.Tensor:
        """A stored tensor with its LoRA adapter, if any, folded in (float32 math, its own dtype)."""
        module = name.removesuffix(".weight")
        if module in self._linear_lora:
            from qtrain.checkpoint.adapter import fold_adapters

            pair = (self._read(f"{module}.lora_A.weight"), self._read(f"{module}.lora_B.weight"))
            return fold_adapters({name: self._read(name)}, {module: pair}, self._lora_scaling, str(self.folder))[name]
        tensor = self._read(name)
        if name in self._expert_lora:
            a, b = self._read(f"{name}_lora.lora_A"), self._read(f"{name}_lora.lora_B")
            tensor = (tensor.float() + torch.bmm(b.float(), a.float()) * self._lora_scaling).to(tensor.dtype)
        return tensor

    def _read(self, name: str) -> torch.Tensor:
        meta = self._meta[name]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        self._dcp_safe.load({"model": {name: tensor}}, self.folder, no_dist=True)
        return tensor

    def close(self) -> None:
        pass


class MegatronSource:
    """A Megatron legacy checkpoint, TP shards merged on demand (see MegatronReader)."""

    def __init__(self, path: str | Path, iteration: int | None = None, weights_only: bool = True):
        self._reader = MegatronReader(path, iteration, weights_only)
        self.config = self._reader.config
        self.hf_config = self._reader.hf_config
        self.iteration = self._reader.iteration
        self.seq_length = self._reader.seq_length
        self.grouped = self._reader.grouped  # the experts' layout (MoE)
        self._experts: _ExpertNames | None = None
        if self._reader.rope_theta_note:  # the config is taken from here: say where its rope_theta came from
            warnings.warn(self._reader.rope_theta_note, RopeThetaWarning, stacklevel=2)
        self.tokenizer_dir = None
        tokenizer = getattr(self._reader.args, "tokenizer_name_or_path", None) or getattr(
            self._reader.args, "tokenizer_model", None)
        if tokenizer:  # MindSpeed records the HF tokenizer folder (or a file inside it)
            folder = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
            self.tokenizer_dir = _has_tokenizer(folder) if folder.is_dir() else None

    @property
    def dtype(self) -> torch.dtype | None:
        return self._reader.dtype

    def names(self) -> list[str]:
        return self._reader.names()

    def get(self, name: str) -> torch.Tensor:
        """By HF name; a MoE layer's experts also by the model's stacked names (for qtrain output)."""
        if self._experts is None:
            self._experts = _ExpertNames(set(self._reader.names()), self._reader.get, self.config.num_experts)
        return self._experts.get(name)

    def close(self) -> None:
        self._reader.close()


class StateDictSource:
    """HF-named tensors already in memory (e.g. a training run's gathered weights) as a Source."""

    def __init__(self, config: Qwen3Config, tensors: dict[str, torch.Tensor], tokenizer_dir: Path | None = None):
        self.config, self.hf_config, self.iteration, self.tokenizer_dir = config, None, None, tokenizer_dir
        self._tensors = tensors
        self._experts = _ExpertNames(tensors, tensors.__getitem__, config.num_experts)
        _check_complete("the model's state dict", self._experts.covered(), config)

    def names(self) -> list[str]:
        return hf_param_names(self.config)

    def get(self, name: str) -> torch.Tensor:
        return self._experts.get(name)

    def close(self) -> None:
        self._tensors = {}


class TrimmedVocab:
    """A source whose embedding and LM head keep only the first `vocab_size` rows (drops padding)."""

    def __init__(self, inner: Source, vocab_size: int):
        self._inner, self._vocab = inner, vocab_size
        self.config, self.hf_config = inner.config, inner.hf_config
        self.iteration, self.tokenizer_dir = inner.iteration, inner.tokenizer_dir
        self.dtype = getattr(inner, "dtype", None)

    def names(self) -> list[str]:
        return self._inner.names()

    def get(self, name: str) -> torch.Tensor:
        t = self._inner.get(name)
        # a copy, so that a writer that stores whole storages (torch.save) stores only the kept rows
        return t[: self._vocab].clone() if name in ("model.embed_tokens.weight", "lm_head.weight") else t

    def close(self) -> None:
        self._inner.close()


def open_source(kind: str, path: str | Path, iteration: int | None = None, weights_only: bool = True) -> Source:
    """A source for `--load-model-type` hf | qtrain | mg."""
    if not Path(path).exists():
        raise CheckpointError(f"--load-dir {path}: no such directory")
    if kind == "hf":
        return HFSource(path)
    if kind == "qtrain":
        return QtrainSource(path, iteration)
    if kind == "mg":
        return MegatronSource(path, iteration, weights_only)
    raise CheckpointError(f"--load-model-type {kind!r}: unknown format; choose hf, qtrain or mg")
