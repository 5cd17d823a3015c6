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
