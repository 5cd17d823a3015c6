"""qtrain DCP checkpoints: round trip, crash safety (kill -9 mid-save), unreadable input."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from qtrain.checkpoint import dcp as ckpt
from qtrain.errors import CheckpointError
from qtrain.models.presets import get_preset
from qtrain.models.qwen3 import build_model
from qtrain.parallel.weights import materialize
from qtrain.train.optim import build_optimizer

TRACKER = "latest_checkpointed_iteration.txt"


def _tiny(seed=0):
    cfg = get_preset("tiny")
    cfg.vocab_size, cfg.num_hidden_layers = 256, 1
    model = materialize(build_model(cfg, "meta"), "cpu", seed=seed)
    return cfg, model, build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    model(ids).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    cfg, model, opt = _tiny()
    _step(model, opt, 1)
    torch.manual_seed(123)
    ckpt.save_checkpoint(tmp_path, 7, model, opt, {"iteration": 7, "consumed_samples": 56},
                         cfg.to_hf_dict(), {"x": 1})
    after_save = torch.rand(3)
    assert (tmp_path / TRACKER).read_text() == "7"
    folder = tmp_path / "iter_0000007"
    assert (folder / ".metadata").is_file() and (folder / "config.json").is_file()
    assert ckpt.read_args_json(folder) == {"x": 1}
    assert ckpt.read_checkpoint_model_config(tmp_path).vocab_size == 256
    _, model2, opt2 = _tiny(seed=5)
    loaded = ckpt.load_checkpoint(tmp_path, model2, opt2)
    assert (loaded.kind, loaded.iteration, loaded.train_state["consumed_samples"]) == ("qtrain", 7, 56)
    assert torch.equal(torch.rand(3), after_save)  # RNG restored to its state at save time
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    _step(model, opt, 2)
    _step(model2, opt2, 2)  # same optimizer state => same update
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n


def test_finetune_and_no_load_optim_take_weights_only(tmp_path):
    cfg, model, opt = _tiny()
    _step(model, opt, 1)
    ckpt.save_checkpoint(tmp_path, 3, model, opt, {"iteration": 3, "consumed_samples": 6}, cfg.to_hf_dict(), {})
    _, model2, opt2 = _tiny(seed=5)
    loaded = ckpt.load_checkpoint(tmp_path, model2, opt2, finetune=True)
    assert loaded.train_state is None and loaded.iteration == 0 and not opt2.state
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)
    _, model3, opt3 = _tiny(seed=5)
    loaded = ckpt.load_checkpoint(tmp_path, model3, opt3, load_optim=False, load_rng=False)
    assert loaded.iteration == 3 and not opt3.state and not loaded.rng_restored


def test_saving_the_same_iteration_again_replaces_it(tmp_path):
    cfg, model, opt = _tiny()
    for _ in range(2):
        ckpt.save_checkpoint(tmp_path, 1, model, opt, {"iteration": 1, "consumed_samples": 0}, cfg.to_hf_dict(), {})
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER]


def test_hf_dir_is_a_starting_point(tmp_path):
    from qtrain.models.hf import save_hf

    cfg, model, opt = _tiny()
    save_hf(model, tmp_path / "hf")
    assert ckpt.detect_kind(tmp_path / "hf") == "hf"
    _, model2, opt2 = _tiny(seed=9)
    loaded = ckpt.load_checkpoint(tmp_path / "hf", model2, opt2)
    assert loaded.kind == "hf" and loaded.train_state is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_unreadable_checkpoints_name_the_problem(tmp_path):
    _, model, opt = _tiny()
    with pytest.raises(CheckpointError, match="no such directory"):
        ckpt.load_checkpoint(tmp_path / "missing", model, opt)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt.load_checkpoint(tmp_path / "junk", model, opt)
    (tmp_path / "junk" / TRACKER).write_text("12")
    with pytest.raises(CheckpointError, match="iteration 12 but .*iter_0000012 is missing"):
        ckpt.load_checkpoint(tmp_path / "junk", model, opt)
    (tmp_path / "junk" / TRACKER).write_text("twelve")
    with pytest.raises(CheckpointError, match="'twelve'"):
        ckpt.load_checkpoint(tmp_path / "junk", model, opt)
    bad = tmp_path / "bad"
    (bad / "iter_0000001").mkdir(parents=True)
    (bad / "iter_0000001" / ".metadata").write_bytes(b"not a pickle")
    (bad / TRACKER).write_text("1")
    with pytest.raises(CheckpointError, match="unreadable DCP metadata"):
        ckpt.load_checkpoint(bad, model, opt)


CHILD = textwrap.dedent("""
    import sys, time, torch
    import torch.distributed.checkpoint as tdcp
    from qtrain.checkpoint import dcp as ckpt
    sys.path.insert(0, {testdir!r})
    from test_dcp import _tiny, _step
    cfg, model, opt = _tiny()
    save_dir = sys.argv[1]
    ckpt.save_checkpoint(save_dir, 1, model, opt, {{"iteration": 1, "consumed_samples": 2}}, cfg.to_hf_dict(), {{}})
    _step(model, opt, 1)
    real_save = tdcp.save
    def stalled_save(*args, **kwargs):
        real_save(*args, **kwargs)           # the tensors of iteration 2 are on disk ...
        print("WRITTEN", flush=True)
        time.sleep(600)                      # ... and the process dies before the rename
    ckpt.dcp.save = stalled_save
    ckpt.save_checkpoint(save_dir, 2, model, opt, {{"iteration": 2, "consumed_samples": 4}}, cfg.to_hf_dict(), {{}})
""")


def test_kill_9_during_save_leaves_previous_checkpoint_as_latest(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(testdir=os.path.dirname(os.path.abspath(__file__))))
    save_dir = tmp_path / "save"
    proc = subprocess.Popen([sys.executable, str(script), str(save_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (save_dir / TRACKER).read_text() == "1"
    assert (save_dir / "iter_0000002.tmp" / ".metadata").is_file()  # the interrupted save
    assert not (save_dir / "iter_0000002").exists()
    _, model, opt = _tiny(seed=3)
    loaded = ckpt.load_checkpoint(save_dir, model, opt)
    assert loaded.iteration == 1 and loaded.train_state["consumed_samples"] == 2
    # the next save at that iteration clears the leftovers
    ckpt.save_checkpoint(save_dir, 2, model, opt, {"iteration": 2, "consumed_samples": 4}, {}, {})
    assert sorted(os.listdir(save_dir)) == ["iter_0000001", "iter_0000002", TRACKER]
