"""Every command, given the bad inputs a careful user tried (issue 15), as a user runs it (qtrain.cli):
the exit status, one line naming the input and the fix, no traceback, and nothing on disk that
looks complete. Each case builds its input from the tiny model, dataset and checkpoint below.

Malicious checkpoints: test_no_code_from_checkpoints.py (tests/checkpoint); signals: test_signals.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bad_input_helpers import (POSITIONS, VOCAB, assert_one_line_error, files_under, run, tiny_dataset, tiny_hf,
                               train_args)

TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Shared inputs: a dataset, a tiny HF dir (vocab 256, 64 positions), a 2-iteration checkpoint."""
    root = tmp_path_factory.mktemp("ws")
    data = tiny_dataset(root / "data" / "a_text_document")
    other = tiny_dataset(root / "data" / "b_text_document", num_docs=50, seed=1)
    hf = tiny_hf(root / "hf")
    from qtrain import cli

    assert cli.main(["pretrain"] + train_args(data, save=root / "ckpt")) == 0
    return {"root": root, "data": data, "other": other, "hf": hf, "ckpt": root / "ckpt"}


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # noqa: ARG001  (tests/conftest.py)
    yield


def a_file(tmp_path: Path) -> Path:
    """A regular file: nothing can be created below it, whoever runs the test (root included)."""
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    return f


# ----------------------------------------------------------------------------- preprocess

def test_preprocess_empty_input_writes_nothing(tmp_path, capsys, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    rc, _, err = run(capsys, "preprocess", "--input", tmp_path / "empty.jsonl", "--output-prefix", tmp_path / "o",
                     "--tokenizer-name-or-path", tokenizer_dir, "--workers", "0")
    assert_one_line_error(rc, err, "preprocess", f"--input {tmp_path / 'empty.jsonl'}", "no tokens to write",
                          "2 blank line(s)", "nothing was written")
    assert files_under(tmp_path) == ["empty.jsonl"]


def test_preprocess_unwritable_output_prefix_stops_before_reading(tmp_path, capsys, tokenizer_dir):
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    prefix = a_file(tmp_path) / "sub" / "out"
    rc, _, err = run(capsys, "preprocess", "--input", tmp_path / "x.jsonl", "--output-prefix", prefix,
                     "--tokenizer-name-or-path", tokenizer_dir)
    assert_one_line_error(rc, err, "preprocess", f"--output-prefix {prefix}", "is a file")
    assert "qtrain preprocess: 1 file(s)" not in err  # stopped before the work began


def test_sharegpt_role_order_is_named(tmp_path, capsys, tokenizer_dir):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": turns}) + "\n")
    rc, _, err = run(capsys, "preprocess", "--input", tmp_path / "c.jsonl", "--output-prefix", tmp_path / "o",
                     "--tokenizer-name-or-path", tokenizer_dir, "--handler-name", "SharegptStyleInstructionHandler",
                     "--prompt-type", "qwen3", "--workers", "0")
    assert_one_line_error(rc, err, "preprocess", f"{tmp_path / 'c.jsonl'}:1",
                          "got 3 turn(s): user -> assistant -> user", "ending with an assistant reply")
    assert files_under(tmp_path) == ["c.jsonl"]


# ----------------------------------------------------------------------------- pretrain

@pytest.mark.parametrize("command, option", [("pretrain", "save"), ("pretrain", "save_hf"),
                                             ("pretrain", "log_dir"), ("sft", "save")])
def test_unwritable_training_output_stops_before_training(ws, tmp_path, capsys, command, option):
    bad = a_file(tmp_path) / "out"
    rc, out, err = run(capsys, command, *train_args(ws["data"], **{option: bad}))
    assert_one_line_error(rc, err, command, f"--{option.replace('_', '-')} {bad}", "is a file")
    assert "training" not in out


def test_second_run_with_the_same_save_dir_is_refused(ws, tmp_path, capsys):
    import socket
    import subprocess

    save = tmp_path / "save"
    save.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # a live process holds the lock
    try:
        (save / ".qtrain.lock").write_text(json.dumps({
            "host": socket.gethostname(), "pid": other.pid, "pid_namespace": os.readlink("/proc/self/ns/pid"),
            "process_start": None, "since": "today", "command": "qtrain pretrain --save x"}))
        rc, _, err = run(capsys, "pretrain", *train_args(ws["data"], save=save))
        assert_one_line_error(rc, err, "pretrain", f"--save {save}: in use by another qtrain run",
                              f"pid {other.pid} on {socket.gethostname()}", "qtrain pretrain --save x")
        assert not (save / TRACKER).exists()
    finally:
        other.kill()
        other.wait()
    # the holder is gone: the lock is stale, the next run takes it over, trains, and releases it
    rc, _, err = run(capsys, "pretrain", *train_args(ws["data"], save=save, train_iters=1))
    assert rc == 0 and "taking over the stale lock" in err, err
    assert (save / TRACKER).read_text() == "1" and not (save / ".qtrain.lock").exists()


@pytest.mark.parametrize("change, needle", [
    ({"seq_length": 8}, "--seq-length 8 (the checkpoint was trained with --seq-length 16)"),
    ({"seed": 7}, "--seed 7 (the checkpoint was trained with --seed 1234)"),
    ({"split": "90,10,0"}, "--split 90,10,0 (the checkpoint was trained with --split 100,0,0)"),
    ({"data_path": "other"}, "b_text_document (the checkpoint was trained on"),
])
def test_resume_with_another_sample_order_is_refused(ws, tmp_path, capsys, change, needle):
    save = tmp_path / "resumed"
    shutil.copytree(ws["ckpt"], save)
    change = {k: ws["other"] if v == "other" else v for k, v in change.items()}
    argv = train_args(ws["data"], load=save, save=save, train_iters=3, eval_iters=0, **change)
    rc, _, err = run(capsys, "pretrain", *argv)
    assert_one_line_error(rc, err, "pretrain", needle, "would change the sample order", "--override-data-order")
    assert (save / TRACKER).read_text() == "2"
    rc, out, err = run(capsys, "pretrain", *argv, "--override-data-order")
    assert rc == 0 and "warning: --override-data-order" in out and (save / TRACKER).read_text() == "3", err
    assert "stale lock" not in err  # the refused run released its lock


def test_resume_from_a_moved_dataset_is_accepted(ws, tmp_path, capsys):
    moved = tmp_path / "moved" / "a_text_document"
    moved.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copyfile(ws["data"] + ext, str(moved) + ext)
    save = tmp_path / "resumed"
    shutil.copytree(ws["ckpt"], save)
    rc, _, err = run(capsys, "pretrain", *train_args(str(moved), load=save, save=save, train_iters=3))
    assert rc == 0, err


def test_shape_mismatch_on_load_is_one_line(ws, tmp_path, capsys):
    rc, _, err = run(capsys, "pretrain", *train_args(ws["data"], load=ws["ckpt"], hidden_size=64, ffn_hidden_size=96,
                                                      save=tmp_path / "s"))
    assert_one_line_error(rc, err, "pretrain", f"--load {ws['ckpt'] / 'iter_0000002'}", "Size mismatch",
                          "torch.Size([256, 32])", "does it match the model flags?")
    assert not (tmp_path / "s" / TRACKER).exists()


def test_token_ids_beyond_the_vocabulary_are_named(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "big_ids_text_document", high=1000)
    rc, _, err = run(capsys, "pretrain", *train_args(data, save=tmp_path / "s"))
    assert_one_line_error(rc, err, "pretrain", "--data-path: token id", "outside the model's vocabulary (0-255)",
                          "--padded-vocab-size")
    assert not (tmp_path / "s" / TRACKER).exists()


def test_empty_dataset_says_so(tmp_path, capsys):
    from qtrain.data.indexed import IndexedDatasetBuilder

    prefix = str(tmp_path / "empty_text_document")
    IndexedDatasetBuilder(prefix + ".bin", np.uint16).finalize(prefix + ".idx")
    rc, _, err = run(capsys, "pretrain", *train_args(prefix))
    assert_one_line_error(rc, err, "pretrain", f"--data-path {prefix}: the dataset holds no documents")
    rc, _, err = run(capsys, "pretrain", *train_args(tiny_dataset(tmp_path / "d"), split="0,100,0"))
    assert_one_line_error(rc, err, "pretrain", "--split 0,100,0 gives the train part no weight")


def test_corrupt_idx_pointers_are_named(ws, tmp_path, capsys):
    from qtrain.data.indexed import IndexedDataset

    prefix = str(tmp_path / "c_text_document")
    shutil.copyfile(ws["data"] + ".bin", prefix + ".bin")
    raw = bytearray(Path(ws["data"] + ".idx").read_bytes())
    n = len(IndexedDataset(ws["data"]))
    at = 34 + 4 * n + 8 * 5  # the 6th sequence pointer
    raw[at:at + 8] = (12345).to_bytes(8, "little")
    Path(prefix + ".idx").write_bytes(bytes(raw))
    rc, _, err = run(capsys, "pretrain", *train_args(prefix))
    assert_one_line_error(rc, err, "pretrain", f"{prefix}.idx: corrupt index: sequence 5", "at byte 12345")
    rc, _, err = run(capsys, "evaluate", "--load", ws["hf"], "--data-path", prefix, "--seq-length", "16")
    assert_one_line_error(rc, err, "evaluate", f"{prefix}.idx: corrupt index")


# ----------------------------------------------------------------------------- convert

def test_convert_into_a_non_empty_dir_needs_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "hf_out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00003.safetensors").write_bytes(b"old shard")
    (out / "config.json").write_text("{}")
    argv = ["convert", "--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", ws["ckpt"],
            "--save-dir", out]
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "convert", f"--save-dir {out}: not empty", "--overwrite")
    assert (out / "config.json").read_text() == "{}"  # untouched
    rc, _, err = run(capsys, *argv, "--overwrite")
    assert rc == 0, err
    assert files_under(out) == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["hf", "mg", "qtrain"])
def test_convert_refuses_unwritable_or_overlapping_save_dir(ws, tmp_path, capsys, target):
    base = ["convert", "--load-model-type", "qtrain", "--save-model-type", target, "--load-dir", ws["ckpt"]]
    bad = a_file(tmp_path) / "out"
    rc, _, err = run(capsys, *base, "--save-dir", bad)
    assert_one_line_error(rc, err, "convert", f"--save-dir {bad}", "is a file")
    rc, _, err = run(capsys, *base, "--save-dir", ws["ckpt"], "--overwrite")
    assert_one_line_error(rc, err, "convert", f"is --load-dir {ws['ckpt']} or holds it")
    rc, _, err = run(capsys, *base, "--save-dir", ws["ckpt"].parent, "--overwrite")
    assert_one_line_error(rc, err, "convert", "or holds it")
    assert (ws["ckpt"] / TRACKER).read_text() == "2"


def test_failed_convert_leaves_no_dir_behind(tmp_path, capsys):
    broken = tiny_hf(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:200])
    out = tmp_path / "out"
    rc, _, err = run(capsys, "convert", "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", broken,
                     "--save-dir", out)
    assert rc == 1 and not out.exists(), err


# ----------------------------------------------------------------------------- generate / evaluate

@pytest.fixture(scope="module")
def hf_real_vocab(tmp_path_factory):
    """A tiny model with the real Qwen3 vocabulary, so the real tokenizer's ids fit it (64 positions)."""
    return tiny_hf(tmp_path_factory.mktemp("hf151k") / "m", vocab=151936)


def test_generate_prompt_longer_than_the_model_is_refused(hf_real_vocab, tmp_path, capsys, tokenizer_dir):
    long_prompt = " ".join(["word"] * 200)
    rc, _, err = run(capsys, "generate", "--load", hf_real_vocab, "--tokenizer-name-or-path", tokenizer_dir,
                     "--no-chat-template", "--greedy", "--prompt", "hi", "--prompt", long_prompt,
                     "--output-file", tmp_path / "out.jsonl")
    assert_one_line_error(rc, err, "generate", "--prompt 2: 200 tokens", f"the model's {POSITIONS - 1} positions",
                          "shorten it")
    assert files_under(tmp_path) == []  # the answer to prompt 1 is not left behind as if complete


def test_generate_caps_new_tokens_at_the_models_positions(hf_real_vocab, tmp_path, capsys, tokenizer_dir):
    rc, _, err = run(capsys, "generate", "--load", hf_real_vocab, "--tokenizer-name-or-path", tokenizer_dir,
                     "--no-chat-template", "--greedy", "--prompt", " ".join(["word"] * 60), "--max-new-tokens", "50",
                     "--output-file", tmp_path / "out.jsonl")
    assert rc == 0 and "warning: --prompt 1: generating at most 4 tokens, not --max-new-tokens 50" in err, err
    assert "response" in json.loads((tmp_path / "out.jsonl").read_text())


def test_generate_tokenizer_larger_than_the_model(ws, tmp_path, capsys, tokenizer_dir):
    rc, _, err = run(capsys, "generate", "--load", ws["hf"], "--tokenizer-name-or-path", tokenizer_dir,
                     "--prompt", "Tell me a story.")
    assert_one_line_error(rc, err, "generate", "--prompt 1: token id", f"(0-{VOCAB - 1})",
                          f"the tokenizer {tokenizer_dir}", "--tokenizer-name-or-path")


def test_generate_unwritable_output_file_stops_before_loading(ws, tmp_path, capsys):
    bad = a_file(tmp_path) / "out.jsonl"
    rc, _, err = run(capsys, "generate", "--load", ws["hf"], "--prompt", "x", "--output-file", bad)
    assert_one_line_error(rc, err, "generate", f"--output-file {bad}", "is a file")


def test_evaluate_seq_length_beyond_the_model(ws, tmp_path, capsys):
    rc, _, err = run(capsys, "evaluate", "--load", ws["hf"], "--data-path", ws["data"], "--seq-length", "8192",
                     "--output-json", tmp_path / "r.json")
    assert_one_line_error(rc, err, "evaluate", f"--seq-length 8192 exceeds the model's {POSITIONS} positions",
                          f"use --seq-length {POSITIONS} or less")
    assert not (tmp_path / "r.json").exists()
    rc, out, err = run(capsys, "evaluate", "--load", ws["hf"], "--data-path", ws["data"], "--max-sequences", "2",
                       "--output-json", tmp_path / "r.json")  # the default window is capped at the model's 64
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["seq_length"] == POSITIONS, err


def test_evaluate_unwritable_output_json_stops_before_loading(ws, tmp_path, capsys):
    bad = a_file(tmp_path) / "r.json"
    rc, _, err = run(capsys, "evaluate", "--load", ws["hf"], "--data-path", ws["data"], "--output-json", bad)
    assert_one_line_error(rc, err, "evaluate", f"--output-json {bad}", "is a file")


def test_evaluate_mmlu_row_with_a_column_too_many(ws, tmp_path, capsys):
    mc = tmp_path / "mc"
    mc.mkdir()
    (mc / "algebra_test.csv").write_text("1+1?,1,2,3,4,B\n2+2?,3,4,5,6,B,extra\n")
    rc, _, err = run(capsys, "evaluate", "--load", ws["hf"], "--data-dir", mc)
    assert_one_line_error(rc, err, "evaluate", f"{mc / 'algebra_test.csv'}:2", "6 fields", "got 7 fields")


# ----------------------------------------------------------------------------- exit status of every command

def test_convert_and_plan_errors_exit_1_usage_errors_exit_2(ws, tmp_path, capsys):
    rc, _, err = run(capsys, "convert", "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", ws["hf"],
                     "--save-dir", tmp_path / "o")
    assert_one_line_error(rc, err, "convert", "tracker file not found")
    rc, _, err = run(capsys, "plan", "--model-preset", "1.7B", "--tensor-model-parallel-size", "3")
    assert_one_line_error(rc, err, "plan", "--num-attention-heads")
    rc, _, err = run(capsys, "convert", "--load-model-type", "gguf")  # the command line itself is wrong
    assert_one_line_error(rc, err, "convert", "argument --load-model-type: invalid choice: 'gguf'",
                          "see `qtrain convert --help`", code=2)
    rc, _, err = run(capsys, "pretrain", "--fp16")
    assert_one_line_error(rc, err, "pretrain", "unsupported flag --fp16", code=2)


def test_os_errors_are_one_line(ws, tmp_path, capsys, monkeypatch):
    """A full disk (or any OSError) while writing: one line naming the file, exit 1."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "model.safetensors"))

    monkeypatch.setattr("qtrain.models.hf.save_file", full)
    rc, _, err = run(capsys, "convert", "--load-model-type", "hf", "--save-model-type", "hf", "--load-dir", ws["hf"],
                     "--save-dir", tmp_path / "o")
    assert_one_line_error(rc, err, "convert", "model.safetensors: No space left on device")
    assert not (tmp_path / "o").exists()


def test_files_follow_the_umask(ws, tmp_path, capsys):
    default = os.umask(0o022)
    try:
        rc, _, err = run(capsys, "convert", "--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir",
                         ws["ckpt"], "--save-dir", tmp_path / "hf")
        assert rc == 0, err
        os.umask(0o027)
        from qtrain.io_utils import write_json_atomic

        write_json_atomic(tmp_path / "private.json", {})
    finally:
        os.umask(default)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o640
    for name in (TRACKER, "iter_0000002/train_state.json", "iter_0000002/config.json"):  # written under the default
        assert (ws["ckpt"] / name).stat().st_mode & 0o777 == 0o666 & ~default, name
