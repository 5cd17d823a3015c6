"""Ctrl-C and SIGTERM as a user or a platform sends them: one line, the documented exit status,
no traceback (from the main process or a worker), and what is on disk stays consistent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bad_input_helpers import assert_one_line_error, tiny_dataset, train_args

REPO = Path(__file__).resolve().parents[2]
TRACKER = "latest_checkpointed_iteration.txt"


def _start(*argv) -> subprocess.Popen:
    # its own session: the signal goes to the whole process group, as a terminal's Ctrl-C does
    return subprocess.Popen([sys.executable, "-u", "-m", "qtrain", *map(str, argv)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "QTRAIN_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})


def _wait_for(proc: subprocess.Popen, stream, text: str, timeout: float = 120) -> list[str]:
    seen, start = [], time.time()
    for line in stream:
        seen.append(line)
        if text in line:
            return seen
        assert time.time() - start < timeout, "".join(seen)
    raise AssertionError(f"{text!r} never appeared:\n" + "".join(seen) + proc.stderr.read())


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_ctrl_c_in_preprocess(tmp_path, tokenizer_dir):
    with open(tmp_path / "big.jsonl", "w") as f:
        for i in range(30000):
            f.write(json.dumps({"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 20}) + "\n")
    proc = _start("preprocess", "--input", tmp_path / "big.jsonl", "--output-prefix", tmp_path / "out",
                  "--tokenizer-name-or-path", tokenizer_dir, "--workers", "2", "--log-interval", "500")
    seen = _wait_for(proc, proc.stderr, "processed ")  # the first chunks are written
    os.killpg(proc.pid, signal.SIGINT)
    rc, _, err = _finish(proc)
    err = "".join(seen) + err
    assert_one_line_error(rc, err, "preprocess", "interrupted (Ctrl-C)", code=130)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]  # no partial .bin/.idx, no temporary file


def test_ctrl_c_in_pretrain_keeps_the_last_checkpoint(tmp_path):
    data = tiny_dataset(tmp_path / "d" / "x_text_document")
    save = tmp_path / "save"
    proc = _start("pretrain", *train_args(data, save=save, train_iters=100000, lr_decay_iters=100000,
                                          save_interval=2))
    _wait_for(proc, proc.stdout, "saved checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    rc, _, err = _finish(proc)
    assert_one_line_error(rc, err, "pretrain", "interrupted (Ctrl-C)", code=130)
    it = int((save / TRACKER).read_text())
    folder = save / f"iter_{it:07d}"
    assert (folder / ".metadata").is_file() and json.loads((folder / "train_state.json").read_text())["iteration"] == it
    assert not (save / ".qtrain.lock").exists()


def test_sigterm_without_save_stops_at_once(tmp_path):
    data = tiny_dataset(tmp_path / "d" / "x_text_document")
    proc = _start("pretrain", *train_args(data, train_iters=100000, lr_decay_iters=100000))
    _wait_for(proc, proc.stdout, " iteration        2/")
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rc, _, err = _finish(proc)
    assert_one_line_error(rc, err, "pretrain", "stopped by SIGTERM; nothing was saved (no --save)", code=143)
    assert time.time() - sent < 30
