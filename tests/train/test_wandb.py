"""W&B with Megatron's flags: an offline run (WANDB_MODE=offline, no network) holds exactly the
records of metrics.jsonl, read back from its run file; without wandb the flag stops the run
naming the install command; the other wandb flags need --wandb-project."""

import os

import pytest

from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.train import wandb_log
from qtrain.train.loop import pretrain
from trainutil import read_metrics, tiny_args

QUIET = lambda *a, **k: None  # noqa: E731


def test_offline_run_holds_the_jsonl_records(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb_records import history

    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "save"
    pretrain(parse_args(tiny_args(tiny_data, save=save, wandb_project="qtrain-test", wandb_exp_name="tiny")),
             log=QUIET)
    runs = list((save / "wandb").glob("wandb/offline-run-*/run-*.wandb"))  # <save>/wandb, as Megatron
    assert len(runs) == 1
    logged = history(runs[0])
    records = read_metrics(save)
    assert {r["iteration"] for r in records} == set(logged) == {1, 2, 3, 4, 5, 6}
    expected: dict[int, dict] = {}
    for r in records:  # a training and a validation record share their iteration's row
        row = expected.setdefault(r["iteration"], {})
        row.update({k: v for k, v in r.items() if k != "iteration" and v is not None})
    assert logged == expected
    assert {"loss", "lr", "grad_norm", "valid_loss"} <= set(logged[6])


def test_wandb_flag_without_wandb_names_the_install(tiny_data, monkeypatch):
    real = wandb_log.importlib.util.find_spec
    monkeypatch.setattr(wandb_log.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"--wandb-project needs the wandb package, which is not installed: "
                                          r"pip install wandb"):
        parse_args(tiny_args(tiny_data, wandb_project="p"))


@pytest.mark.parametrize("flag", ["wandb_exp_name", "wandb_save_dir", "wandb_entity"])
def test_wandb_options_need_a_project(tiny_data, flag):
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} needs --wandb-project"):
        parse_args(tiny_args(tiny_data, **{flag: "x"}))


def test_save_dir_follows_megatron(tiny_data):
    cfg = parse_args(tiny_args(tiny_data, save="/ckpt"))
    assert wandb_log.save_dir(cfg) == os.path.join("/ckpt", "wandb")
