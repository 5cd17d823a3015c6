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


def test_live_holder_is_refused_by_name(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps(_holder(pid=sleeper.pid, process_start=None)))
        with pytest.raises(CheckpointError, match=f"in use by another qtrain run \\(pid {sleeper.pid} on "):
            DirLock(tmp_path, "--save").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_other_machines_are_judged_by_their_heartbeat(tmp_path, monkeypatch, capsys):
    """A holder on another node (or a restarted pod of the same name) cannot be asked: its heartbeat
    (the lock file touched every HEARTBEAT_S) tells whether it runs."""
    import threading

    monkeypatch.setattr("qtrain.checkpoint.lock.WATCH_S", 0.6)
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps(_holder(host="node-7", pid=1)))
    stop = threading.Event()

    def beat():  # the other run, alive
        while not stop.wait(0.05):
            os.utime(lock_file)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(CheckpointError, match=f"on node-7.*If that run is gone, delete {lock_file}"):
            DirLock(tmp_path, "--save-dir").acquire()
    finally:
        stop.set()
        beating.join()
    assert "watching it for 1 s" in capsys.readouterr().err
    DirLock(tmp_path, "--save").acquire().release()  # no heartbeat any more: that run is gone
    assert "taking over the stale lock" in capsys.readouterr().err
    lock_file.write_text(json.dumps(_holder(host="node-7", pid=1)))
    old = time.time() - 3600
    os.utime(lock_file, (old, old))
    DirLock(tmp_path, "--save").acquire().release()  # untouched for an hour: stale without watching
    assert "watching" not in capsys.readouterr().err


def test_the_holder_beats(tmp_path, monkeypatch):
    monkeypatch.setattr("qtrain.checkpoint.lock.HEARTBEAT_S", 0.05)
    lock = DirLock(tmp_path, "--save").acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 60
    lock.release()


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
