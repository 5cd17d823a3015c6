"""Loading a checkpoint never runs code from it (issue 15, item 1).

Each crafted checkpoint below runs `touch <marker>` when read the way torch reads it by default
(the control at the start of each test shows that it does); every qtrain command that reads it
must refuse it (or ignore the crafted part) without the marker appearing: `.metadata` of a DCP
dir, the pickled `train_state` and `rng` entries of the format before JSON, a non-tensor optimizer
entry, and a Megatron rank file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from bad_input_helpers import RunsShell, assert_one_line_error, run, shell_pickle, tiny_dataset, train_args

TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # noqa: ARG001  (tests/conftest.py)
    yield


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real 2-iteration checkpoint of the 1-layer test model, and its data."""
    root = tmp_path_factory.mktemp("good")
    data = tiny_dataset(root / "data" / "a_text_document")
    from qtrain import cli

    assert cli.main(["pretrain"] + train_args(data, save=root / "ckpt")) == 0
    return root / "ckpt", data


def _copy(good_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    dst = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, dst)
    return dst, dst / "iter_0000002"


def _everything(folder: Path) -> dict:
    """The whole DCP state of a (trusted) checkpoint, read the way torch does by default."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(folder.parent / "all.pt"))
    state = torch.load(folder.parent / "all.pt", weights_only=False)
    (folder.parent / "all.pt").unlink()
    return state


def _resave(folder: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    for p in folder.iterdir():
        if p.name == ".metadata" or p.suffix == ".distcp":
            p.unlink()
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def _torch_default_load(folder: Path, keys: dict) -> None:
    """What torch's own reader and planner do with these entries (the control)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(keys, checkpoint_id=str(folder), no_dist=True)


def _commands(ckpt: Path, data: str, tmp_path: Path, finetune_ok: bool) -> list[tuple[list, int, tuple]]:
    """(argv, expected exit status, needles) for every command that reads a qtrain checkpoint."""
    return [
        (["pretrain", *train_args(data, load=ckpt, train_iters=3)], 1, ()),
        (["pretrain", *train_args(data, load=ckpt, train_iters=1, finetune=True)], 0 if finetune_ok else 1, ()),
        (["generate", "--load", ckpt, "--prompt", "x", "--tokenizer-name-or-path", tmp_path / "none",
          "--max-new-tokens", "1"], None, ()),
        (["evaluate", "--load", ckpt, "--data-path", data, "--max-sequences", "1"], 0 if finetune_ok else 1, ()),
        (["convert", "--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", ckpt,
          "--save-dir", tmp_path / "hf"], 0 if finetune_ok else 1, ()),
    ]


def _run_all(capsys, ckpt, data, tmp_path, marker, finetune_ok, needles) -> None:
    for argv, code, _ in _commands(ckpt, data, tmp_path, finetune_ok):
        rc, _, err = run(capsys, *argv)
        assert not marker.exists(), (argv[0], "ran the checkpoint's code")
        if code is None:  # generate: refused, or (weights are fine) stopped at the missing tokenizer
            assert rc == 1 and "Traceback" not in err, err
        elif code == 1:
            assert_one_line_error(rc, err, argv[0], *needles)
        else:
            assert rc == 0, (argv[0], err)
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)


def test_metadata_that_runs_code_is_refused_everywhere(good, tmp_path, capsys):
    ckpt, folder = _copy(good[0], tmp_path)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(shell_pickle(marker))
    pickle.loads((folder / ".metadata").read_bytes())  # the control: torch's reader (pickle.load) runs it
    assert marker.exists()
    marker.unlink()
    _run_all(capsys, ckpt, good[1], tmp_path, marker, finetune_ok=False,
             needles=(".metadata: refusing to read it", "posix.system"))


def test_pickled_train_state_of_the_old_format_is_never_unpickled(good, tmp_path, capsys):
    ckpt, folder = _copy(good[0], tmp_path)
    marker = tmp_path / "ran"
    state = _everything(folder)
    state["train_state"] = RunsShell(marker)  # format 1 kept pickled objects in the DCP state dict
    _resave(folder, state)
    (folder / "train_state.json").unlink()
    shutil.rmtree(folder / "rng")
    _torch_default_load(folder, {"train_state": None})  # the control: torch's planner runs it
    assert marker.exists()
    marker.unlink()
    _run_all(capsys, ckpt, good[1], tmp_path, marker, finetune_ok=True,
             needles=("pickled its train state and RNG", "--finetune"))


def test_pickled_rng_of_the_old_format_is_never_unpickled(good, tmp_path, capsys):
    ckpt, folder = _copy(good[0], tmp_path)
    marker = tmp_path / "ran"
    state = _everything(folder)
    state["train_state"] = pickle.dumps({"iteration": 2, "consumed_samples": 4})
    state["rng"] = {"rank_0": RunsShell(marker)}
    _resave(folder, state)
    (folder / "train_state.json").unlink()
    shutil.rmtree(folder / "rng")
    _torch_default_load(folder, {"rng": {"rank_0": None}})
    assert marker.exists()
    marker.unlink()
    _run_all(capsys, ckpt, good[1], tmp_path, marker, finetune_ok=True,
             needles=("pickled its train state and RNG", "--finetune"))


def test_a_non_tensor_entry_that_runs_code_is_refused(good, tmp_path, capsys):
    """The current format: an optimizer entry (a learning rate, say) replaced by a pickle that runs code."""
    ckpt, folder = _copy(good[0], tmp_path)
    marker = tmp_path / "ran"
    state = _everything(folder)
    state["optim"]["param_groups.model.norm.weight.lr"] = RunsShell(marker)  # flattened optimizer state
    _resave(folder, state)
    _torch_default_load(folder, {"optim": {"param_groups.model.norm.weight.lr": None}})
    assert marker.exists()
    marker.unlink()
    rc, _, err = run(capsys, "pretrain", *train_args(good[1], load=ckpt, train_iters=3))
    assert not marker.exists()
    assert_one_line_error(rc, err, "pretrain", "optim.param_groups.model.norm.weight.lr: refusing to unpickle it")
    # the weights themselves are fine: reading only them (finetune, convert) works
    _run_all(capsys, ckpt, good[1], tmp_path, marker, finetune_ok=True, needles=("refusing to unpickle",))


def test_a_broken_rng_file_is_named(good, tmp_path, capsys):
    ckpt, folder = _copy(good[0], tmp_path)
    (folder / "rng" / "rank_0.json").write_text(json.dumps({"python": "?"}))
    rc, _, err = run(capsys, "pretrain", *train_args(good[1], load=ckpt, save=ckpt, train_iters=3))
    assert_one_line_error(rc, err, "pretrain", f"{folder / 'rng' / 'rank_0.json'}: not a valid RNG state",
                          "--no-load-rng")
    rc, _, err = run(capsys, "pretrain", *train_args(good[1], load=ckpt, save=ckpt, train_iters=3, no_load_rng=True))
    assert rc == 0 and (ckpt / TRACKER).read_text() == "3", err


def test_megatron_rank_file_that_runs_code_is_refused(good, tmp_path, capsys):
    mg = tmp_path / "mg"
    rc, _, err = run(capsys, "convert", "--load-model-type", "qtrain", "--save-model-type", "mg", "--load-dir", good[0],
                     "--save-dir", mg)
    assert rc == 0, err
    rank_file = mg / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(rank_file, weights_only=False)
    marker = tmp_path / "ran"
    obj["rng_state"] = [RunsShell(marker)]
    torch.save(obj, rank_file)
    torch.load(rank_file, weights_only=False)  # the control: a plain torch.load runs it
    assert marker.exists()
    marker.unlink()
    shape = train_args(good[1])
    for argv in (["convert", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg,
                  "--save-dir", tmp_path / "hf"],
                 ["generate", "--load", mg, "--prompt", "x"],
                 ["evaluate", "--load", mg, "--data-path", good[1]],
                 ["pretrain", *shape, "--load", str(mg)]):
        rc, _, err = run(capsys, *argv)
        assert not marker.exists(), argv[0]
        assert_one_line_error(rc, err, argv[0], f"{rank_file}: refusing to unpickle it", "--trust-pickle")
    assert not (tmp_path / "hf").exists()


def test_a_qtrain_checkpoint_holds_no_pickled_state(good):
    """qtrain's own state is JSON; the only non-tensor DCP entries are the optimizer's hyperparameters."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from qtrain.checkpoint.dcp_safe import read_metadata

    folder = good[0] / "iter_0000002"
    entries = read_metadata(folder).state_dict_metadata
    non_tensor = sorted(k for k, v in entries.items() if isinstance(v, BytesStorageMetadata))
    assert non_tensor and all(k.startswith("optim.param_groups.") for k in non_tensor), non_tensor
    state = json.loads((folder / "train_state.json").read_text())
    assert (state["format"], state["iteration"], state["world_size"]) == (2, 2, 1)
    assert set(json.loads((folder / "rng" / "rank_0.json").read_text())) == {"python", "numpy", "torch"}
