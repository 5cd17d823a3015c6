"""benchmarks/train_throughput.py --smoke: the GPU benchmark's code paths (one-rank FSDP2 training
step, the HF anchor, the fused-vs-reference correctness check, the table) on a tiny CPU model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


@pytest.mark.timeout(240)
def test_smoke_run_writes_table_and_results(tmp_path):
    only = "qtrain smoke mbs1,hf_fp32master,correctness"
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--smoke", "--only", only, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"qtrain smoke mbs1", "hf_fp32master s64", "correctness smoke"}
    assert all(r["status"] == "ok" for r in rows.values()), [(n, r.get("error")) for n, r in rows.items()]
    assert rows["qtrain smoke mbs1"]["tokens_per_s"] > 0 and rows["qtrain smoke mbs1"]["step_s"] > 0
    assert rows["hf_fp32master s64"]["tokens_per_s"] > 0
    check = rows["correctness smoke"]
    # On the CPU both paths are the reference: identical curves and logits, and the loss falls.
    assert check["loss_fused"] == check["loss_reference"] and check["max_abs_loss_diff"] == 0.0
    assert check["loss_reference"][-1] < check["loss_reference"][0]
    assert check["logits_ok"] and check["loss_ok"] and check["logits_max_abs_diff"] == 0.0
    assert set(check["ops"]["fused"].values()) == {"reference"}
    md = (tmp_path / "results.md").read_text()
    assert "| qtrain smoke mbs1 | smoke | 1 | 64 |" in md and "correctness smoke: max |loss diff|" in md
    assert (tmp_path / "log.txt").read_text().count("=====") == 3


def test_worker_reports_failures_as_rows():
    """A broken config becomes a row with its error, not a crash of the whole call."""
    cfg = {"kind": "qtrain", "name": "bad", "model": "no-such-model", "seq": 8, "mbs": 1, "compile": False,
           "ops": "auto", "recompute": None, "warmup": 1, "steps": 1}
    proc = subprocess.run([sys.executable, str(SCRIPT), "worker", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert proc.returncode == 0 and result["status"] == "error" and "no-such-model" in result["error"]
