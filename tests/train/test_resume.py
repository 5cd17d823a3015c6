"""Exact resume: N iterations straight == resume from the checkpoint the run left at N/2 and
train N/2 more -- bit-identical loss at every iteration, in one process and with 2
data-parallel ranks (gloo, FSDP2, bf16 compute; there with the optimizer state in host memory and an
async save)."""

import os
import shutil
import subprocess
import sys

import pytest

from qtrain.config import parse_args
from qtrain.train.loop import pretrain
from trainutil import free_port, tiny_args, train_losses

QUIET = lambda *a, **k: None  # noqa: E731
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _checkpoint_at(src, dst, iteration: int) -> None:
    """What a run killed after saving `iteration` leaves behind: that checkpoint as latest."""
    os.makedirs(dst)
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(str(iteration))


def test_exact_resume_single_process(tiny_data, tmp_path):
    # --load == --save with nothing saved yet starts from scratch, as Megatron does
    straight = pretrain(parse_args(tiny_args(tiny_data, save=tmp_path / "a", load=tmp_path / "a", save_interval=3,
                                             tensorboard_dir=tmp_path / "tb")), log=QUIET)
    assert straight.start_iteration == 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    assert [os.path.basename(p) for p in straight.saved] == ["iter_0000003", "iter_0000006"]
    _checkpoint_at(tmp_path / "a", tmp_path / "b", 3)
    resumed = pretrain(parse_args(tiny_args(tiny_data, save=tmp_path / "b", load=tmp_path / "b")), log=QUIET)
    assert resumed.start_iteration == 3 and resumed.consumed_samples == 24
    assert sorted(resumed.losses) == [4, 5, 6]
    assert {k: straight.losses[k] for k in (4, 5, 6)} == resumed.losses  # bit-identical
    assert resumed.valid == {6: straight.valid[6]}
    assert straight.losses[6] < straight.losses[3]  # it does train


def _torchrun(args, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "qtrain.cli", "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QTRAIN_DEVICE": "cpu"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_exact_resume_two_ranks_gloo(tiny_data, tmp_path):
    common = dict(micro_batch_size=1, global_batch_size=4, train_iters=4, eval_interval=2, bf16=True)
    # both runs keep the optimizer state in host memory (--optimizer-cpu-offload), and the one that
    # saves does so in the background (--async-save): its checkpoint resumes exactly
    offload = dict(optimizer_cpu_offload=True)
    proc = _torchrun(tiny_args(tiny_data, save=tmp_path / "a", save_interval=2, async_save=True, **offload, **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DP 2 x 2 micro-batches" in proc.stdout and "(--optimizer-cpu-offload)" in proc.stdout
    _checkpoint_at(tmp_path / "a", tmp_path / "b", 2)
    proc = _torchrun(tiny_args(tiny_data, save=tmp_path / "b", load=tmp_path / "b", **offload, **common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(straight) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert resumed == {k: straight[k] for k in (3, 4)}  # bit-identical
    # the 2-rank (FSDP-sharded) checkpoint reshards onto one process: same samples, close losses
    _checkpoint_at(tmp_path / "a", tmp_path / "c", 2)
    one = pretrain(parse_args(tiny_args(tiny_data, save=tmp_path / "c", load=tmp_path / "c", **common)), log=QUIET)
    assert one.start_iteration == 2 and one.consumed_samples == 16
    assert one.losses == pytest.approx({k: straight[k] for k in (3, 4)}, rel=2e-2)

