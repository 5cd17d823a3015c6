"""Reading a DCP (torch.distributed.checkpoint) directory without running code from it.

torch's `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`, and its
`DefaultLoadPlanner.load_bytes` reads every non-tensor entry with `torch.load(weights_only=False)`:
a crafted checkpoint runs whatever it likes on load. Every qtrain path that reads a DCP dir
(`--load` for training, generate, evaluate, `qtrain convert --load-model-type qtrain`, resharding)
goes through `SafeReader` and `SafePlanner` instead:

- `.metadata` is unpickled with an allowlist of the classes torch's DCP metadata is made of
  (its dataclasses, `torch.Size`, dtypes, layouts, a path); any other global is refused;
- every data file the metadata names must be a plain file inside the checkpoint dir;
- non-tensor entries (an optimizer's learning rate, betas, ...) are read with
  `torch.load(weights_only=True)`: numbers, strings, tuples, lists, dicts, tensors only.

Tensor entries were already read with `weights_only=True` by torch.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from qtrain.errors import CheckpointError

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},  # layout name -> torch.layout
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


class _Refused(pickle.UnpicklingError):
    """A global outside the allowlist (as opposed to a damaged file)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"global {module}.{name} is not one of torch's DCP metadata classes")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent ids do not occur in DCP metadata")


def read_metadata(folder: str | Path) -> Metadata:
    """The `.metadata` of a DCP dir, unpickled through the allowlist; CheckpointError if it is
    unreadable, holds anything else, or names data files outside the dir."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refusing to read it ({e}); a qtrain/DCP checkpoint holds only tensor "
                              f"metadata there, so this file was not written by torch.distributed.checkpoint "
                              f"or was altered: do not load this checkpoint") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a DCP checkpoint dir (or an incomplete one)") from None
    except Exception as e:  # truncated, or a pickle of other data
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e}); "
                              f"the checkpoint is damaged or incomplete") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not DCP metadata (found {type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{path}: names data file {name!r}, not a file inside {Path(folder)}; "
                                  f"refusing to read it")
    return metadata


class SafeReader(FileSystemReader):
    """torch's FileSystemReader, with `.metadata` read by `read_metadata` above."""

    def __init__(self, folder: str | Path):
        super().__init__(str(folder))
        self._folder = Path(folder)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self._folder}: per-rank DCP metadata is not supported")
        metadata = read_metadata(self._folder)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """torch's DefaultLoadPlanner, reading non-tensor entries with `torch.load(weights_only=True)`
    (torch's own `load_bytes` uses weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint entry {fqn}: refusing to unpickle it ({str(e).splitlines()[0]}); "
                                  f"only numbers, strings, containers and tensors are read from a checkpoint") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load(state: dict[str, Any], folder: str | Path, no_dist: bool, hint: str = "") -> None:
    """`dcp.load(state, ...)` of a DCP dir through SafeReader and SafePlanner; torch's
    CheckpointException (a BaseException) becomes CheckpointError naming the first failure,
    followed by `hint` when torch (not qtrain's checks) failed, e.g. on a shape mismatch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # single-process loads are meant: torch's notice about it is noise
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:
        reason, ours = describe_failure(e)
        raise CheckpointError(f"{folder}: {reason}" + ("" if ours or not hint else f"; {hint}")) from None


def describe_failure(e: BaseException) -> tuple[str, bool]:
    """(the first failing rank's exception in one line, whether it is qtrain's CheckpointError);
    a CheckpointException's str() is a multi-line traceback per rank."""
    failures = getattr(e, "failures", None) or {}
    for rank, failure in sorted(failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return str(inner), True
        text = " ".join(str(inner).split())
        return f"cannot restore it ({type(inner).__name__} on rank {rank}: {text})", False
    return "cannot restore it (torch.distributed.checkpoint failed without a reason)", False
