"""One writer per output dir: a lock file naming the host and process that holds it.

`qtrain pretrain/sft --save DIR` and `qtrain convert --save-dir DIR` take `DIR/.qtrain.lock`
before any work starts, so a second run with the same dir stops at once with a message naming
the first, instead of both overwriting each other's checkpoints. The file is created whole
(written under a temporary name, then hard-linked into place, which fails if it exists) and
removed when the run ends, also on errors and Ctrl-C.

A lock whose process is gone (killed, OOM-killed, a crashed node) is *stale* and taken over with
a note. When it names this host (and PID namespace), qtrain checks whether that PID still runs
the same process (its start time): an answer at once. A holder elsewhere (another node, a
restarted pod of the same name) cannot be asked; instead every holder touches its lock file every
HEARTBEAT_S seconds, and a newcomer watches the file for WATCH_S seconds: if it changes, its run is
alive and the newcomer stops; if not, the run is gone (so a platform restarting a killed job
resumes after at most WATCH_S). A lock untouched for STALE_S seconds is stale at once.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from qtrain.errors import CheckpointError

LOCK_FILE = ".qtrain.lock"
HEARTBEAT_S = 20.0  # a holder touches its lock this often
WATCH_S = 70.0  # a newcomer watches a lock of another machine this long for a heartbeat
STALE_S = 300.0  # a lock untouched this long (by this machine's clock) is stale at once

_held: list["DirLock"] = []


def _proc_start(pid: int) -> Optional[str]:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after the command name


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def me() -> dict[str, Any]:
    """What a lock file records about its holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "process_start": _proc_start(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}


def is_stale(holder: dict[str, Any]) -> Optional[bool]:
    """Whether the holder is a process of this machine that no longer runs (or is this process);
    None for a holder elsewhere, which cannot be asked (see `DirLock._watch`)."""
    mine = me()
    if holder.get("host") != mine["host"] or holder.get("pid_namespace") != mine["pid_namespace"]:
        return None  # another machine or container
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    if pid == mine["pid"]:
        return True  # left by this process (an earlier run in the same Python process)
    if not _alive(pid):
        return True
    start = holder.get("process_start")
    return start is not None and _proc_start(pid) not in (None, start)  # the PID was reused


class DirLock:
    """`DirLock(dir, "--save").acquire()` ... `release()`; also released at interpreter exit."""

    def __init__(self, directory: str | Path, option: str):
        self.directory, self.option = Path(directory), option
        self.path = self.directory / LOCK_FILE
        self._text: Optional[str] = None
        self._stop = threading.Event()

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(me())
        for _ in range(3):
            if self._create(text):
                self._text = text
                _held.append(self)
                self._stop.clear()
                threading.Thread(target=self._beat, name="qtrain-lock-heartbeat", daemon=True).start()
                return self
            holder_text, holder = self._read()
            if holder_text is None:
                continue  # released meanwhile: try again
            age = self._age()
            if holder is None:
                if age < 60:  # being written through the fallback path: let its writer finish
                    raise CheckpointError(f"{self.option} {self.directory}: another qtrain run is starting to use it "
                                          f"({self.path}); wait for it, or choose another {self.option}")
                stale: Optional[bool] = True
            else:
                stale = is_stale(holder)
                if stale is None:
                    stale = age > STALE_S or self._watch(holder)
            if not stale:
                raise CheckpointError(
                    f"{self.option} {self.directory}: in use by another qtrain run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}: {holder.get('command')}); wait for it to end "
                    f"or choose another {self.option}. If that run is gone, delete {self.path}")
            if holder is not None and (holder.get("pid") != os.getpid() or holder.get("host") != socket.gethostname()):
                print(f"qtrain: taking over the stale lock {self.path} (left by pid {holder.get('pid')} on "
                      f"{holder.get('host')}, which has ended)", file=sys.stderr)
            self._remove_if_unchanged(holder_text)
        raise CheckpointError(f"{self.option} {self.directory}: could not take {self.path} (others keep taking it); "
                              f"is another qtrain run starting with this {self.option}?")

    def release(self) -> None:
        self._stop.set()
        if self._text is None:
            return
        if self._read()[0] == self._text:  # still ours
            self.path.unlink(missing_ok=True)
        self._text = None
        if self in _held:
            _held.remove(self)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- heartbeat

    def _beat(self) -> None:
        """Touch the lock while it is ours, so that a newcomer on another machine sees this run live."""
        while not self._stop.wait(HEARTBEAT_S):
            if self._text is None or self._read()[0] != self._text:
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _watch(self, holder: dict[str, Any]) -> bool:
        """Watch a lock of another machine for WATCH_S seconds: True (stale) if it neither changes
        nor goes away."""
        print(f"qtrain: {self.path} is held by pid {holder.get('pid')} on {holder.get('host')}; watching it for "
              f"{WATCH_S:.0f} s to see whether that run is alive", file=sys.stderr, flush=True)
        try:
            first = self.path.stat()
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline:
            time.sleep(min(1.0, WATCH_S / 10))
            try:
                now = self.path.stat()
            except FileNotFoundError:
                return True  # released: the caller tries again
            if (now.st_mtime_ns, now.st_ino) != (first.st_mtime_ns, first.st_ino):
                return False
        return True

    # -- file operations

    def _create(self, text: str) -> bool:
        """Create the lock file with its whole content, or return False if it exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)  # atomic, fails if the lock exists, and never shows a half-written file
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> tuple[Optional[str], Optional[dict]]:
        """(file text or None if absent, parsed holder or None if unparseable)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            return text, None
        return text, holder if isinstance(holder, dict) else None

    def _remove_if_unchanged(self, text: str) -> None:
        """Remove a stale lock, unless another run has replaced it since it was read: it is moved
        aside first (atomic), and put back if it turns out to be a fresh lock."""
        aside = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.stale")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text() != text:
                os.link(aside, self.path)
        except OSError:
            pass
        finally:
            aside.unlink(missing_ok=True)


def release_all() -> None:
    """Release every lock this process still holds (at exit, and after a failed command)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_all)
