"""examples/qwen3/pretrain_qwen3_1.7b_4k.sh (MindSpeed-LLM's flag groups) runs in tiny mode on
2 CPU ranks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainutil import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "qwen3" / "pretrain_qwen3_1.7b_4k.sh"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pretrain_script_tiny_mode_trains(tiny_data, tmp_path):
    repo = str(SCRIPT.parents[2])
    env = {**os.environ, "QTRAIN_TINY": "1", "DATA_PATH": tiny_data, "CKPT_SAVE_DIR": str(tmp_path / "ckpt"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), "QTRAIN_DEVICE": "cpu"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "iteration        4/       4" in proc.stdout and "DP 2" in proc.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert (tmp_path / "logs" / "pretrain_qwen3_1.7b_4k.log").is_file()
