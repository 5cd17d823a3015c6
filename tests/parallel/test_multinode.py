"""Two "nodes" on loopback: two torchrun invocations (--nnodes 2 --node-rank 0/1, static
rendezvous at 127.0.0.1) run the real `qtrain pretrain` with a pipeline stage on each node,
train, validate (the pipeline's eval schedule), save and export HF dirs (also every 2 iterations); the training and
validation losses match a one-process run of the same command, the export holds the final
checkpoint's weights, and one process resumes the two-node checkpoint exactly where the
one-process run goes on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parallel_helpers import REPO, free_port, worker_env


def tiny_dataset(prefix: Path) -> str:
    from qtrain.data.indexed import IndexedDatasetBuilder

    rng = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
    for _ in range(60):
        builder.add_item(rng.randint(0, 250, size=rng.randint(20, 80)).astype(np.uint16))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def pretrain_args(data: str, save: Path, iters: int) -> list[str]:
    return ["pretrain", "--model-preset", "tiny", "--padded-vocab-size", "256", "--num-layers", "2",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters),
            "--lr", "3e-3", "--lr-decay-style", "constant", "--data-path", data, "--split", "80,20,0",
            "--eval-iters", "1", "--eval-interval", "2", "--log-interval", "1", "--save", str(save),
            "--save-interval", "4"]


def run_single(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "qtrain", *args], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def loss_rows(save: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in rows if "loss" in r]


def losses(save: Path) -> dict[int, float]:
    return dict(loss_rows(save))


def valid_losses(save: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["valid_loss"] for r in rows if "valid_loss" in r}


@pytest.mark.timeout(600)
def test_two_node_loopback_trains_and_saves(tmp_path):
    data = tiny_dataset(tmp_path / "tiny_text_document")
    run_single(pretrain_args(data, tmp_path / "one", 6))

    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "qtrain", *pretrain_args(data, tmp_path / "two", 4), "--pipeline-model-parallel-size", "2",
         "--save-hf", str(tmp_path / "two_hf"), "--save-interval", "2", "--save-hf-interval", "2"],
        cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=400) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    saved = tmp_path / "two"
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (saved / "iter_0000004" / ".metadata").is_file()
    one, two = losses(tmp_path / "one"), losses(saved)
    assert sorted(two) == [1, 2, 3, 4]
    for it in two:
        assert two[it] == pytest.approx(one[it], rel=1e-5)
    one_valid, two_valid = valid_losses(tmp_path / "one"), valid_losses(saved)
    assert sorted(two_valid) == [2, 4] and sorted(one_valid) == [2, 4, 6]
    for it in two_valid:
        assert two_valid[it] == pytest.approx(one_valid[it], rel=1e-5)

    # --save-hf under PP: no rank holds every layer; rank 0 writes the final checkpoint's weights
    from qtrain.checkpoint.sources import QtrainSource
    from qtrain.models.hf import iter_safetensors

    exported = dict(iter_safetensors(tmp_path / "two_hf"))
    final = QtrainSource(saved, 4)
    assert set(exported) == set(final.names())
    for name, tensor in exported.items():
        assert tensor.dtype == final.get(name).dtype and (tensor == final.get(name)).all(), name
    # --save-hf-interval under PP: each export converted from the checkpoint of its iteration
    from hf_logits import assert_export_has_checkpoint_logits

    assert sorted(p.name for p in (tmp_path / "two_hf").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    for it in ("iter_0000002", "iter_0000004"):
        assert_export_has_checkpoint_logits(tmp_path / "two_hf" / it, saved / it)

    # the two-node pipeline checkpoint goes on in one process like the uninterrupted run
    run_single(pretrain_args(data, saved, 6) + ["--load", str(saved)])
    assert [it for it, _ in loss_rows(saved)] == [1, 2, 3, 4, 5, 6]  # resumed at 5, not restarted
    resumed = losses(saved)
    for it in (5, 6):
        assert resumed[it] == pytest.approx(one[it], rel=1e-5)
    assert valid_losses(saved)[6] == pytest.approx(one_valid[6], rel=1e-5)
