"""benchmarks/lm_head_loss_memory.py on a small shape: both paths run in their own process, the
report has both rows, and the chunked path's measured loss term is the plan's figure."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_lm_head_loss_memory_report(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_head_loss_memory.py"), "--vocab", "4096",
                           "--hidden", "64", "--seq", "512", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "| logits |" in text and "| chunked |" in text
    plan, measured = map(float, re.search(r"loss term for this shape .*: ([\d.]+) MiB, measured ([\d.]+) MiB",
                                          text).groups())
    assert measured == pytest.approx(plan, rel=0.01) and plan > 0
