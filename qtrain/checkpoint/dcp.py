"""Training checkpoints with torch.distributed.checkpoint (DCP): save, resume, and starting points.

Layout (read by `qtrain convert`):

    <save>/latest_checkpointed_iteration.txt   the iteration, written LAST and atomically
    <save>/iter_0000100/                        a DCP directory:
        {"model": {HF param name: fp32 tensor}, "optim": AdamW state}
    <save>/iter_0000100/train_state.json        iteration, consumed samples, sampler, world size
    <save>/iter_0000100/rng/rank_<r>.json       RNG states of rank r (see run_state.py)
    <save>/iter_0000100/config.json             HF-style model config
    <save>/iter_0000100/qtrain_args.json        the training options

Loading never runs code from the checkpoint: DCP metadata and non-tensor entries are read
through dcp_safe.py, qtrain's own state is JSON.

Crash safety: every rank writes into `iter_0000100.tmp/`; once all have finished, rank 0 writes
the JSON state, renames it to `iter_0000100/` and only then rewrites the tracker. A kill at any
point leaves the tracker naming the previous complete checkpoint. An async save (`--async-save`)
is the same sequence with the tensor writes in a background thread: the rename and the tracker
wait until they are done (`PendingSave.finish`). Model and optimizer go through
`get_state_dict`/`set_state_dict`, so FSDP/TP-sharded (DTensor) state saves reshardably.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from qtrain.checkpoint import dcp_safe, run_state
from qtrain.checkpoint.layout import TRACKER, iteration_dir_name, read_tracker, swap_into_place, write_tracker
from qtrain.errors import CheckpointError
from qtrain.io_utils import write_json_atomic

# Optimizer state keyed per parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"), not
# by each rank's param-group lists: pipeline stages hold different parameters, and this is what
# lets a checkpoint written under one layout load under another.
_SD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

CONFIG_FILE = "config.json"
ARGS_FILE = "qtrain_args.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- discovery

def checkpoint_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / iteration_dir_name(iteration)


def latest_iteration(save_dir: str | Path) -> Optional[int | str]:
    """The tracker's iteration, or None when there is no tracker yet."""
    return read_tracker(save_dir, missing_ok=True)


def detect_kind(path: str | Path) -> str:
    """'qtrain' (DCP), 'megatron' (legacy mp_rank_* files), 'hf' (config.json + safetensors).

    Raises CheckpointError naming the path when it is none of them.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--load {path}: no such directory")
    it = read_tracker(path, missing_ok=True)
    if (path / ".metadata").is_file():
        return "qtrain"
    if it is not None:
        sub = path / iteration_dir_name(it)
        if (sub / ".metadata").is_file():
            return "qtrain"
        if sub.is_dir() and any(p.name.startswith("mp_rank_") for p in sub.iterdir()):
            return "megatron"
        raise CheckpointError(f"--load {path}: {TRACKER} names iteration {it} but {sub} is missing or "
                              f"incomplete (neither a DCP .metadata nor mp_rank_* files)")
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or
                                             (path / "model.safetensors.index.json").is_file()):
        return "hf"
    raise CheckpointError(
        f"--load {path}: not a checkpoint (expected {TRACKER} + iter_XXXXXXX/ from qtrain or Megatron, "
        f"or an HF dir with config.json and *.safetensors)")


def load_kind(load: str | Path | None, save: str | Path | None = None) -> Optional[str]:
    """What `--load` gives a training run: 'qtrain', 'megatron' or 'hf' (see detect_kind), or None
    when there is nothing to load: no --load, or --load == --save before the first save there
    (a fresh start, as Megatron does). Any other unreadable --load raises CheckpointError."""
    if not load:
        return None
    load = Path(load)
    if save and load.resolve() == Path(save).resolve() and (
            not load.is_dir() or not any(load.iterdir())
            or (latest_iteration(load) is None and not (load / CONFIG_FILE).is_file())):
        return None
    return detect_kind(load)


def read_checkpoint_model_config(path: str | Path):
    """The Qwen3Config stored with a qtrain checkpoint (the tracker's iteration, or the dir itself)."""
    from qtrain.models.config import Qwen3Config

    path = Path(path)
    it = latest_iteration(path)
    folder = path if it is None else checkpoint_dir(path, it)
    return Qwen3Config.from_json(folder / CONFIG_FILE)


# ----------------------------------------------------------------------------- save

def save_checkpoint(save_dir: str | Path, iteration: int, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], train_state: dict[str, Any],
                    model_config_json: dict, args_json: dict) -> Path:
    """Write `<save_dir>/iter_XXXXXXX/` and then the tracker. Every rank must call this."""
    return start_save(save_dir, iteration, model, optimizer, train_state, model_config_json, args_json).finish()


def start_save(save_dir: str | Path, iteration: int, model: torch.nn.Module,
               optimizer: Optional[torch.optim.Optimizer], train_state: dict[str, Any],
               model_config_json: dict, args_json: dict, async_group=None) -> "PendingSave":
    """Begin writing `<save_dir>/iter_XXXXXXX.tmp/`; `PendingSave.finish()` completes it.

    With `async_group` (a gloo process group of every rank, see `async_save_group`) the tensors
    are copied to host memory here and written by a background thread
    (torch.distributed.checkpoint.async_save): training goes on while they are written. Without
    it they are written before this returns. Every rank must call this, and later `finish()`.
    """
    final = checkpoint_dir(save_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=_SD_OPTIONS)
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    # Before dcp.save: rank 0 finishes it only after every rank has written, so its rename in
    # finish() never races another rank's RNG file.
    run_state.write_rng(tmp, _rank())
    with warnings.catch_warnings():  # torch's notice that a single process saves is noise in every save
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if async_group is None:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            future = None
        else:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=async_group)
    return PendingSave(Path(save_dir), iteration, tmp, final, future,
                       {**train_state, "world_size": _world()}, model_config_json, args_json)


def async_save_group():
    """The process group async saves coordinate over: gloo (DCP's background thread talks on the
    host), and not the training group, whose collectives would interleave with the writer's."""
    return dist.new_group(backend="gloo")


@dataclass
class PendingSave:
    """A checkpoint whose tensors are written (or being written) into `tmp`; `finish()` waits for
    them and only then writes qtrain's JSON state, renames `tmp` to `final` and moves the tracker."""

    save_dir: Path
    iteration: int
    tmp: Path
    final: Path
    future: Any  # concurrent.futures.Future of an async save; None once written
    train_state: dict
    model_config_json: dict
    args_json: dict

    def finish(self) -> Path:
        """Every rank must call this. Raises the writer's error (the tracker then stays put)."""
        if self.future is not None:
            future, self.future = self.future, None
            future.result()  # rank 0's result arrives after every rank's tensors are written
        if _rank() == 0:
            run_state.write_train_state(self.tmp, self.train_state)
            write_json_atomic(self.tmp / CONFIG_FILE, self.model_config_json)
            write_json_atomic(self.tmp / ARGS_FILE, self.args_json)
            swap_into_place(self.tmp, self.final)  # saving the same iteration again replaces the old one
            _fsync_dir(self.final.parent)
            write_tracker(self.save_dir, self.iteration)
        _barrier()
        return self.final


def _fsync_dir(path: Path) -> None:
    # Make the rename durable before the tracker points at it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- load

@dataclass
class Loaded:
    """What a load restored: `train_state` is None when starting from weights only."""

    kind: str
    path: Path
    iteration: int = 0
    train_state: Optional[dict] = None
    rng_restored: bool = False


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], *,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
                    log: Optional[Callable[[str], None]] = None) -> Loaded:
    """Restore from a qtrain checkpoint, or take the weights of an HF / Megatron dir.

    qtrain checkpoints restore model, optimizer (unless `load_optim=False`), this rank's RNG
    (unless `load_rng=False` or the world size changed) and the train state; `finetune` takes
    the weights only and starts at iteration 0. HF and Megatron dirs always give weights only.
    `log`: told what is being read (and, on rank 0, per-tensor progress of HF / Megatron weights).
    """
    path = Path(path)
    kind = detect_kind(path)
    say = log or (lambda message: None)
    if kind == "hf":
        from safetensors import safe_open

        from qtrain.models.hf import iter_model_tensors, safetensors_files

        files = safetensors_files(path)
        try:
            count = 0
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    count += len(handle.keys())
        except Exception:  # noqa: BLE001  (a broken file: iter_safetensors names it below)
            count = 0
        say(f"loading HF weights from {path}: {count} tensors, {_bytes(files)} in {len(files)} files")
        # Qwen3-MoE per-expert tensors are stacked on the way: one stacked parameter held at a time
        stacked = model.config.is_moe  # fewer tensors than the files hold: no count to show
        _set_full_weights(model, iter_model_tensors(path, model.config), path,
                          _progress(log, count) if count and not stacked else None)
        return Loaded(kind, path)
    if kind == "megatron":
        from qtrain.checkpoint.megatron import MegatronReader

        reader = MegatronReader(path)  # TP shards merged tensor by tensor, as they are copied in
        try:
            say(f"loading Megatron weights from {path}: {len(reader.names())} tensors")
            # Qwen3-MoE per-expert tensors are stacked on the way: fewer tensors than listed, no count to show
            _set_full_weights(model, _stacked(reader, model.config), path,
                              None if model.config.is_moe else _progress(log, len(reader.names())))
        finally:
            reader.close()
        return Loaded(kind, path)

    it = latest_iteration(path)
    folder = path if it is None else checkpoint_dir(path, it)
    keys = set(dcp_safe.read_metadata(folder).state_dict_metadata)
    resumable = (folder / run_state.TRAIN_STATE_FILE).is_file()
    if not resumable and run_state.LEGACY_KEY in keys and not finetune:
        raise CheckpointError(
            f"--load {folder}: written by an earlier qtrain that pickled its train state and RNG, which qtrain "
            f"no longer unpickles (a pickle can run code); resuming it is not possible: start from its weights "
            f"with --finetune")
    if not resumable:
        finetune = True  # weights only (e.g. written by `qtrain convert`): start at iteration 0
    if _holds_adapters(keys) and not _holds_adapters(n for n, _ in model.named_parameters()):
        # A LoRA run's checkpoint into a model without adapters: its weights are base + adapters merged.
        if not finetune:
            raise CheckpointError(f"--load {folder}: a LoRA run's checkpoint; resume it with the same --lora-* "
                                  f"flags, or start from its merged weights with --finetune")
        from qtrain.checkpoint.sources import QtrainSource

        from qtrain.models.qwen3 import build_model

        source, cfg = QtrainSource(folder), model.config
        names = [n for n in build_model(cfg, "meta").state_dict()  # the model's names (MoE: stacked experts)
                 if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        _set_full_weights(model, ((name, source.get(name)) for name in names), folder, _progress(log, len(names)))
        return Loaded(kind, folder)
    with_optim = optimizer is not None and load_optim and not finetune
    if with_optim and not any(k.startswith("optim.") for k in keys):
        raise CheckpointError(f"--load {folder}: no optimizer state saved; add --no-load-optim")
    train_state = None if finetune else run_state.read_train_state(folder)
    files = [f for f in folder.iterdir() if f.suffix == ".distcp"]
    say(f"loading qtrain checkpoint {folder}: model{' + optimizer' if with_optim else ''} state from "
        f"{_bytes(files)} in {len(files)} files{'' if with_optim else ' (optimizer state not read)'}")
    # Only ask for the optimizer's state dict when restoring it: asking initialises its state.
    model_sd, optim_sd = get_state_dict(model, optimizer if with_optim else [], options=_SD_OPTIONS)
    state: dict[str, Any] = {"model": model_sd}
    if with_optim:
        state["optim"] = optim_sd
    try:
        dcp_safe.load(state, folder, no_dist=not dist.is_initialized(),
                      hint=f"the checkpoint's model config is {folder / CONFIG_FILE}: does it match the model flags?")
    except CheckpointError as e:
        raise CheckpointError(f"--load {e}") from None
    set_state_dict(model, optimizer if with_optim else [], model_state_dict=state["model"],
                   optim_state_dict=state["optim"] if with_optim else {}, options=_SD_OPTIONS)
    if finetune:
        return Loaded(kind, folder)
    with_rng = load_rng and train_state["world_size"] == _world()
    if with_rng:
        run_state.restore_rng(folder, _rank())
    return Loaded(kind, folder, train_state["iteration"], train_state, with_rng)


def _holds_adapters(names: Iterable[str]) -> bool:
    """LoRA adapters among these state-dict names: linear layers' and Qwen3-MoE experts' (train.lora*)."""
    return any(n.endswith(".lora_A.weight") or n.endswith("_lora.lora_A") for n in names)


def _bytes(files: list[Path]) -> str:
    from qtrain.progress import human_bytes

    return human_bytes(sum(f.stat().st_size for f in files))


def _progress(log: Optional[Callable[[str], None]], total: int):
    """Per-tensor progress of a weights load, shown by rank 0 of a run that logs."""
    if log is None or _rank() != 0:
        return None
    from qtrain.progress import Progress

    return Progress("loading weights", total)


def _stacked(tensors: Iterable[tuple[str, torch.Tensor]], cfg) -> Iterable[tuple[str, torch.Tensor]]:
    """HF-named tensors with Qwen3-MoE's per-expert ones gathered into the model's stacked parameters
    (a MegatronReader lists a layer's experts together, so one layer's stacks are held at a time)."""
    if not cfg.is_moe:
        yield from tensors
        return
    from qtrain.models.hf_experts import ExpertStacker

    stacker = ExpertStacker(cfg.num_experts)
    for name, tensor in tensors:
        yield from stacker.add(name, tensor)


def _set_full_weights(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: Path,
                      progress=None) -> None:
    """Load full (unsharded) HF-named tensors, one at a time, into a possibly sharded model.

    Each rank reads every tensor (from the page cache the ranks of a node share) and keeps its
    own slice, so no rank ever holds more than its shard plus one full tensor. A pipeline stage
    takes its own layers; the names of other stages are expected, not unexpected.
    """
    from qtrain.models.qwen3 import build_model
    from qtrain.parallel.full_tensors import copy_full_into
    from qtrain.parallel.weights import canonical_name

    cfg = model.config
    every_name = set(build_model(cfg, "meta").state_dict())  # the whole model's names, on meta
    params = {canonical_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    tied = cfg.tie_word_embeddings
    unexpected, loaded = [], set()
    for name, tensor in tensors:
        if progress is not None:
            progress.update(1, tensor.numel() * tensor.element_size())
        if name not in every_name:
            unexpected.append(name)
            continue
        if tied and name == "lm_head.weight":
            continue  # HF ignores the copy of a tied embedding; the embedding fills the head below
        targets = [name] + (["lm_head.weight"] if tied and name == "model.embed_tokens.weight" else [])
        for target in targets:
            param = params.get(target)
            if param is None:
                continue  # another pipeline stage's tensor
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"--load {source}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"expects {tuple(param.shape)}; check the model flags")
            copy_full_into(param, tensor)
            loaded.add(target)
    if progress is not None:
        progress.close()
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        raise CheckpointError(f"--load {source}: weights do not match the model (missing: "
                              f"{missing[:5]}, unexpected: {sorted(unexpected)[:5]}); "
                              f"check the model flags / preset against {source}/config.json")


def read_args_json(folder: str | Path) -> dict:
    """The training options saved next to a checkpoint."""
    return json.loads((Path(folder) / ARGS_FILE).read_text())
