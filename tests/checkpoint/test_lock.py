"""The output-dir lock (qtrain/checkpoint/lock.py): one writer per dir, stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from qtrain.checkpoint.lock import LOCK_FILE, DirLock, me
from qtrain.errors import CheckpointError


def _holder(**over) -> dict:
    return {**me(), "command": "qtrain pretrain --save elsewhere", **over}


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_lock_is_exclusive_and_released(tmp_path):
    lock = DirLock(tmp_path / "save", "--save").acquire()
    held = json.loads((tmp_path / "save" / LOCK_FILE).read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    assert sorted(p.name for p in (tmp_path / "save").iterdir()) == [LOCK_FILE]  # no temporary file left
    lock.release()
    assert not (tmp_path / "save" / LOCK_FILE).exists()
    with DirLock(tmp_path / "save", "--save"):
        assert (tmp_path / "save" / LOCK_FILE).exists()
    assert not (tmp_path / "save" / LOCK_FILE).exists()


def test_live_holder_and_other_host_are_refused_by_name(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(pid=sleeper.pid, process_start=None)))
        with pytest.raises(CheckpointError, match=f"in use by another qtrain run \\(pid {sleeper.pid} on "):
            DirLock(tmp_path, "--save").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(host="node-7", pid=_dead_pid())))
    with pytest.raises(CheckpointError, match=f"on node-7.*If that run is gone, delete {tmp_path / LOCK_FILE}"):
        DirLock(tmp_path, "--save-dir").acquire()  # another machine: its process cannot be checked from here


def test_stale_locks_are_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(pid=_dead_pid())))
    DirLock(tmp_path, "--save").acquire().release()
    assert "taking over the stale lock" in capsys.readouterr().err
    # a live PID that now belongs to another process (reused after a reboot): its start time differs
    (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(pid=os.getppid(), process_start="1")))
    DirLock(tmp_path, "--save").acquire().release()
    # a lock left unparseable long ago (a writer killed mid-write on a file system without links)
    (tmp_path / LOCK_FILE).write_text("{")
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    DirLock(tmp_path, "--save").acquire().release()
    (tmp_path / LOCK_FILE).write_text("{")  # ... but a fresh one is being written right now
    with pytest.raises(CheckpointError, match="starting to use it"):
        DirLock(tmp_path, "--save").acquire()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = DirLock(tmp_path, "--save").acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(host="node-7")))  # replaced meanwhile (by hand)
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-7"


def test_a_fresh_lock_is_not_removed_as_stale(tmp_path):
    """Two runs find the same stale lock; the slower one must not remove the lock the faster one took."""
    lock = DirLock(tmp_path, "--save")
    stale = json.dumps(_holder(pid=_dead_pid()))
    (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(host="node-7")))  # the faster run's fresh lock
    lock._remove_if_unchanged(stale)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-7"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
