"""Atomic file writes: a crash never leaves a file that looks complete and is not.

Files get the permissions any other tool's would (0666 minus the umask), although they are
first written under a `mkstemp` name (0600) or by a library that creates them 0600 (safetensors):
see `follow_umask`. `check_writable_*` test an output location before the work starts, not after
hours of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from qtrain.errors import ConfigError


def umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file the mode a plain `open(path, "w")` would have: 0666 minus the umask."""
    os.chmod(path, 0o666 & ~umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        follow_umask(tmp)  # whoever wrote it (mkstemp, a library replacing the file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_dir(folder: Path, option: str, path: str | Path) -> None:
    """Create and remove a file in `folder` (os.access says yes to root on read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".qtrain-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write in {folder} ({e.strerror}); choose a writable "
                          f"location or fix its permissions") from None


def check_writable_dir(path: str | Path, option: str, shown: str | Path | None = None) -> None:
    """`path` is (or can be created as) a directory this process can write in; creates nothing.
    Messages name `shown` (default: `path`) as the option's value."""
    shown = path if shown is None else shown
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {shown}: {p} is a file, not a directory; choose another location")
    base = _existing_ancestor(p)
    if not base.is_dir():
        raise ConfigError(f"{option} {shown}: {base} is a file, so no directory can be made below it; "
                          f"choose another location")
    _probe_dir(base, option, shown)


def check_writable_file(path: str | Path, option: str) -> None:
    """A file can be written (atomically: a new file beside it, renamed onto it) at `path`."""
    p = Path(path).absolute()
    if p.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; give a file name")
    check_writable_dir(p.parent, option, shown=path)
