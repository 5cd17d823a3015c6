"""`qtrain`, `qtrain --version` and `qtrain env` as a user runs them."""

import json
import subprocess
import sys

import pytest

import qtrain
from qtrain import env


def _run(*args):
    return subprocess.run([sys.executable, "-m", "qtrain", *args], capture_output=True, text=True)


def test_version_and_help():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"qtrain {qtrain.__version__}"
    out = _run()
    assert out.returncode == 0 and "preprocess" in out.stdout and "pretrain" in out.stdout


def test_unknown_command_is_named():
    out = _run("pretrian")
    assert out.returncode == 2 and "unknown command 'pretrian'; did you mean pretrain?" in out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_env_reports_cpu_and_passes_here():
    out = _run("env")
    assert out.returncode == 0, out.stderr
    assert "device type  cpu" in out.stdout and "torch" in out.stdout
    data = json.loads(_run("env", "--json").stdout)
    assert data["ok"] is True and data["device_type"] == "cpu"
    assert data["devices"][0].startswith("cpu")
    assert data["preprocess_tokenizer"]["path"] in ("fast", "unchecked")  # the fast path unless a tokenizer refutes it


def test_env_fails_on_a_known_bad_combination(monkeypatch, capsys):
    real = env._version
    monkeypatch.setattr(env, "_version", lambda name: "2.1.0" if name == "torch" else real(name))
    assert env.main([]) == 1
    assert "torch 2.1.0 is too old" in capsys.readouterr().err


def test_env_fails_on_mismatched_torch_npu(monkeypatch):
    real = env._version
    fake = {"torch": "2.7.1", "torch_npu": "2.1.0.post3"}
    monkeypatch.setattr(env, "_version", lambda name: fake.get(name) or real(name))
    report = env.collect()
    assert not report.ok and any("torch_npu" in p for p in report.problems)


@pytest.mark.parametrize("have,minimum,ok", [("2.13.0+cpu", "2.6", True), ("2.5.1", "2.6", False),
                                             ("4.51.3", "4.51", True), ("0.3.9", "0.4", False)])
def test_version_comparison(have, minimum, ok):
    assert (env._as_tuple(have) >= env._as_tuple(minimum)) == ok


# In a fresh process (tiktoken made unimportable when asked, as in an environment that lacks it):
# what `qtrain env --json` reports, its text line, and the first line `qtrain preprocess` logs.
ENV_AND_PREPROCESS = """
import contextlib, io, json, sys
block, tokenizer, corpus, prefix = sys.argv[1:]
if block == "1":
    sys.modules["tiktoken"] = None
from qtrain import env
from qtrain.data import preprocess
report = env.collect(tokenizer)
log = io.StringIO()
with contextlib.redirect_stderr(log):
    rc = preprocess.main(["--input", corpus, "--tokenizer-name-or-path", tokenizer, "--output-prefix", prefix,
                          "--workers", "0"])
print(json.dumps({"env": report.tokenizer, "line": env._describe(report.tokenizer), "rc": rc,
                  "log": log.getvalue()}))
"""


@pytest.mark.parametrize("tiktoken", [True, False], ids=["tiktoken", "no-tiktoken"])
def test_env_and_the_preprocess_log_name_the_same_tokenizer_path(tmp_path, tokenizer_dir, tiktoken):
    """`qtrain env` says which tokenizer path preprocessing takes (and why not the fast one); the
    preprocess log's first line says the same."""
    (tmp_path / "x.jsonl").write_text('{"text": "hello world"}\n')
    out = subprocess.run([sys.executable, "-c", ENV_AND_PREPROCESS, "0" if tiktoken else "1", str(tokenizer_dir),
                          str(tmp_path / "x.jsonl"), str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["env"]["tokenizer"] == str(tokenizer_dir.resolve()) and got["rc"] == 0
    first = got["log"].splitlines()[0]
    assert first.startswith("qtrain preprocess: ")
    if tiktoken:
        assert got["env"]["path"] == "fast" and got["env"]["reason"] is None
        assert got["line"].startswith("tiktoken fast path (self-check passed on ")
        assert "(tiktoken fast path)" in first, first
    else:
        assert got["env"]["path"] == "hf" and "tiktoken is not installed" in got["env"]["reason"]
        assert got["line"].startswith("HF tokenizer, the slow path (tiktoken is not installed")
        assert "(HF tokenizer, the slow path: tiktoken is not installed" in first, first


def test_env_without_a_tokenizer_to_check(monkeypatch):
    from qtrain.data import tokenizer
    from qtrain.errors import DataError

    def missing():
        raise DataError("not installed")

    monkeypatch.setattr(tokenizer, "find_qwen3_tokenizer", missing)
    tok, problem = env.preprocess_tokenizer()
    assert tok["path"] == "unchecked" and "--tokenizer-name-or-path" in tok["reason"] and problem is None
    tok, problem = env.preprocess_tokenizer("/nonexistent/tokenizer")
    assert tok["path"] == "hf" and "not a directory" in problem


def test_env_fails_without_tiktoken(monkeypatch, capsys):
    real = env._version
    monkeypatch.setattr(env, "_version", lambda name: None if name == "tiktoken" else real(name))
    assert env.main([]) == 1
    assert "tiktoken is not installed (qtrain needs >= 0.7" in capsys.readouterr().err
