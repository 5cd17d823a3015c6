"""`qtrain pretrain` end to end on tiny data: bad input stops before start, dry run, NaN stop,
SIGTERM saves, starting from an HF dir gives the HF model's loss."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain import cli
from qtrain.config import parse_args
from qtrain.train.loop import NonFiniteError, pretrain
from tolerances import assert_close_scaled, qwen3_terms
from trainutil import read_metrics, tiny_args

QUIET = lambda *a, **k: None  # noqa: E731
REPO = Path(__file__).resolve().parents[2]
TRACKER = "latest_checkpointed_iteration.txt"


def _main(argv, capsys):
    rc = cli.main(["pretrain"] + [str(a) for a in argv])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("over, message", [
    ({"data_path": "/nonexistent/corpus_text_document"}, "/nonexistent/corpus_text_document"),
    ({"micro_batch_size": 3, "global_batch_size": 4}, "--global-batch-size 4 is not divisible by --micro-batch-size 3"),
    ({"max_position_embeddings": 16}, "--seq-length 32 exceeds the model's max_position_embeddings 16"),
    ({"data_path": None}, "--data-path is required"),
    ({"train_iters": None}, "--train-iters is required"),
])
def test_bad_input_stops_before_training(tiny_data, tmp_path, capsys, over, message):
    rc, out = _main(tiny_args(tiny_data, save=tmp_path / "s", **over), capsys)
    assert rc == 1 and message in out.err and "Traceback" not in out.err
    assert not (tmp_path / "s" / TRACKER).exists()


def test_unknown_flag_and_unreadable_checkpoint(tiny_data, tmp_path, capsys):
    rc, out = _main(tiny_args(tiny_data) + ["--use-magic-kernels"], capsys)
    assert rc == 2 and "unsupported flag --use-magic-kernels" in out.err  # a usage error
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.pt").write_bytes(b"garbage")
    rc, out = _main(tiny_args(tiny_data, load=junk), capsys)
    assert rc == 1 and f"--load {junk}: not a checkpoint" in out.err


def test_dry_run_prints_plan_for_the_mindspeed_1p7b_script(capsys):
    from test_config import mindspeed_argv

    rc, out = _main(mindspeed_argv() + ["--dry-run"], capsys)
    assert rc == 0, out.err
    from qtrain.models.presets import get_preset

    n = get_preset("1.7B").num_params
    assert f"parameters   {n:,}" in out.out
    assert "world 2 = TP 1 x PP 2 x CP 1 x DP 1" in out.out
    assert "GBS 32 = MBS 1 x DP 1 x 32 accumulation steps" in out.out
    assert "memory/device" in out.out and "13.14 GFLOP/token" in out.out


def test_nan_loss_stops_with_iteration_and_saves_nothing_after(tiny_data, tmp_path, monkeypatch):
    from qtrain.train.loop import LoopHooks
    from qtrain.train.step import mean_loss

    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = mean_loss(*args)
        return loss * float("nan") if calls["n"] == 5 else loss  # 2 micro-batches/step: iteration 3

    hooks = LoopHooks(loss_weight=poisoned)
    cfg = parse_args(tiny_args(tiny_data, save=tmp_path, save_interval=1, log_interval=10))
    with pytest.raises(NonFiniteError, match="NaN/Inf at iteration 3"):
        pretrain(cfg, log=QUIET, hooks=hooks)
    assert (tmp_path / TRACKER).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")) == ["iter_0000001", "iter_0000002"]


def test_sigterm_finishes_the_step_saves_and_exits_0(tiny_data, tmp_path):
    argv = tiny_args(tiny_data, save=tmp_path, train_iters=100000, lr_decay_iters=1000, eval_iters=0)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "qtrain", "pretrain", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "QTRAIN_DEVICE": "cpu"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(" iteration        2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received: stopping after iteration" in out
    it = int((tmp_path / TRACKER).read_text())
    assert 2 <= it < 100000 and (tmp_path / f"iter_{it:07d}" / ".metadata").is_file()
    assert read_metrics(tmp_path)[-1]["iteration"] == it


def _first_batch_loss(model, tiny_data) -> float:
    """Mean loss of the first global batch (samples 0-3 as two micro-batches of 2)."""
    from qtrain.data.blended import build_gpt_datasets
    from qtrain.data.gpt_dataset import GPTDatasetConfig
    from qtrain.ops.cross_entropy import cross_entropy

    ds = build_gpt_datasets([tiny_data], [12, 8, 0], GPTDatasetConfig(seq_length=32, seed=1234, split="90,10,0"))[0]
    with torch.no_grad():
        return float(sum(cross_entropy(model(torch.stack([ds[i]["input_ids"] for i in idx])),
                                       torch.stack([ds[i]["labels"] for i in idx]))
                         for idx in ([0, 1], [2, 3])) / 2)


def _random_tiny_model(seed=77):
    from qtrain.config import resolve_model_config
    from qtrain.models.qwen3 import build_model
    from qtrain.parallel.weights import materialize

    return materialize(build_model(resolve_model_config(parse_args(tiny_args("x"))), "meta"), "cpu", seed=seed)


def test_load_from_hf_dir_starts_with_the_hf_models_loss(tiny_data, tmp_path):
    from qtrain.models.hf import load_hf, save_hf

    save_hf(_random_tiny_model(), tmp_path / "hf")
    expected = _first_batch_loss(load_hf(tmp_path / "hf"), tiny_data)
    # no shape flags: the HF config.json gives the model
    argv = tiny_args(tiny_data, model_preset=None, padded_vocab_size=None, num_layers=None, load=tmp_path / "hf",
                     train_iters=3, save=tmp_path / "out", save_hf=tmp_path / "hf_out")
    result = pretrain(parse_args(argv), log=QUIET)
    assert_close_scaled(result.losses[1], expected, terms=qwen3_terms(load_hf(tmp_path / "hf").config, 32, tokens=128))
    assert (tmp_path / "hf_out" / "config.json").is_file()
    assert load_hf(tmp_path / "hf_out").config.num_hidden_layers == 2


def test_load_from_megatron_dir_starts_with_its_loss(tiny_data, tmp_path):
    from qtrain.checkpoint.megatron import save_megatron

    model = _random_tiny_model(seed=5)
    sd = model.state_dict()
    save_megatron(lambda name: sd[name], model.config, tmp_path / "mg", tp=1, pp=1)
    expected = _first_batch_loss(model, tiny_data)
    result = pretrain(parse_args(tiny_args(tiny_data, load=tmp_path / "mg", train_iters=3, no_load_optim=True,
                                           no_load_rng=True)), log=QUIET)
    assert result.start_iteration == 0
    assert_close_scaled(result.losses[1], expected, terms=qwen3_terms(model.config, 32, tokens=128))


def test_hooks_that_cannot_run_under_pipeline_parallelism_are_refused():
    from qtrain.errors import ConfigError
    from qtrain.train.loop import LoopHooks

    LoopHooks(build_datasets=lambda cfg, sizes: (None, None), skip_load=True).refuse_under_pipeline()  # data: fine
    hooks = LoopHooks(loss_weight=lambda total, count, batch: total, after_save=lambda *a: None)
    with pytest.raises(ConfigError, match=r"--pipeline-model-parallel-size > 1 does not support a loss other than "
                                          r".*; writing extra files with each checkpoint"):
        hooks.refuse_under_pipeline()
