"""--async-save: the same losses as saving in line, exact resume from an async checkpoint, a kill
while a write is in flight leaves the previous checkpoint as latest; old checkpoints pruned only
after a new one is complete (--keep-last-checkpoints, --save-retain-interval)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from qtrain.checkpoint.retention import checkpoints_to_delete
from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.train.loop import pretrain
from trainutil import tiny_args

QUIET = lambda *a, **k: None  # noqa: E731
TRACKER = "latest_checkpointed_iteration.txt"


def test_retention_rules_keep_the_latest_and_never_look_ahead():
    assert checkpoints_to_delete([2, 4, 6, 8], 8, None, None) == []
    assert checkpoints_to_delete([2, 4, 6, 8], 8, 2, None) == [2, 4]
    assert checkpoints_to_delete([2, 4, 6, 8], 8, None, 4) == [2, 6]
    assert checkpoints_to_delete([2, 4, 6, 8], 8, 1, 4) == [2, 6]
    assert checkpoints_to_delete([2, 4, 6, 8, 10], 6, 1, None) == [2, 4]  # 8, 10: another run's, kept
    assert checkpoints_to_delete([3, 6], 6, None, 4) == [3]  # the tracker's (6) stays


def test_long_run_flags_need_save(tiny_data):
    for flag in ("--async-save", "--keep-last-checkpoints"):
        argv = tiny_args(tiny_data) + [flag] + (["2"] if flag != "--async-save" else [])
        with pytest.raises(ConfigError, match=f"{flag} needs --save"):
            parse_args(argv)
    with pytest.raises(ConfigError, match="--save-retain-interval must be a positive"):
        parse_args(tiny_args(tiny_data, save="x", save_retain_interval=0))


def test_async_save_same_losses_retention_and_exact_resume(tiny_data, tmp_path):
    inline = pretrain(parse_args(tiny_args(tiny_data, save=tmp_path / "a", save_interval=2)), log=QUIET)
    lines = []
    background = pretrain(parse_args(tiny_args(tiny_data, save=tmp_path / "b", save_interval=2, async_save=True,
                                               save_retain_interval=4)), log=lines.append)
    assert background.losses == inline.losses and background.valid == inline.valid
    assert [os.path.basename(p) for p in background.saved] == ["iter_0000002", "iter_0000004", "iter_0000006"]
    # iteration 2 went once 4 was complete; 4 is a multiple of the retain interval, 6 is the latest
    assert sorted(os.listdir(tmp_path / "b")) == ["iter_0000004", "iter_0000006", TRACKER, "metrics.jsonl"]
    assert any("deleted checkpoint" in line and "iter_0000002" in line for line in lines)
    os.remove(tmp_path / "b" / "iter_0000006" / ".metadata")  # only the async checkpoint of 4 can load
    (tmp_path / "b" / TRACKER).write_text("4")
    resumed = pretrain(parse_args(tiny_args(tiny_data, save=tmp_path / "b", load=tmp_path / "b")), log=QUIET)
    assert resumed.start_iteration == 4
    assert resumed.losses == {k: inline.losses[k] for k in (5, 6)}  # bit-identical


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {testdir!r})
    from torch.distributed.checkpoint import filesystem
    from qtrain.config import parse_args
    from qtrain.train.loop import pretrain
    from trainutil import tiny_args

    real_write = filesystem.FileSystemWriter.write_data
    def stalled_write(self, plan, planner):  # in DCP's writer thread
        if "iter_0000004" in str(self.path):
            print("WRITER STALLED", flush=True)
            time.sleep(600)
        return real_write(self, plan, planner)
    filesystem.FileSystemWriter.write_data = stalled_write
    pretrain(parse_args(tiny_args({data!r}, save=sys.argv[1], save_interval=2, async_save=True,
                                  keep_last_checkpoints=1)), log=lambda m: print(m, flush=True))
""")


@pytest.mark.usefixtures("one_thread")  # bit-identical losses: one intra-op thread, as the child uses
def test_kill_during_async_write_leaves_previous_checkpoint(tiny_data, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(testdir=os.path.dirname(os.path.abspath(__file__)), data=tiny_data))
    save = tmp_path / "save"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QTRAIN_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, str(script), str(save)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "waiting for the checkpoint of iteration 4" in line:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    text = "".join(seen)
    assert "WRITER STALLED" in text, text[-2000:]
    # training went on while iteration 4 was being written: 5 and 6 ran before the wait
    stalled_at = text.index("WRITER STALLED")
    assert "iteration        6/" in text[stalled_at:], text[-2000:]
    assert (save / TRACKER).read_text() == "2"
    assert (save / "iter_0000004.tmp").is_dir() and not (save / "iter_0000004").exists()
    assert (save / "iter_0000002").is_dir()  # the tracker's: kept despite --keep-last-checkpoints 1
    straight = pretrain(parse_args(tiny_args(tiny_data)), log=QUIET)
    resumed = pretrain(parse_args(tiny_args(tiny_data, save=save, load=save, save_interval=2)), log=QUIET)
    assert resumed.start_iteration == 2
    assert resumed.losses == {k: straight.losses[k] for k in (3, 4, 5, 6)}  # bit-identical
    assert not (save / "iter_0000004.tmp").exists()  # the resumed run's save at 4 cleared the leftovers
