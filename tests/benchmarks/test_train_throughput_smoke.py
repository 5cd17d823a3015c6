"""benchmarks/train_throughput.py --smoke: the GPU benchmark's code paths on a tiny CPU model: qtrain
rows run `qtrain pretrain` itself and read their figures from its metrics.jsonl, the HF anchor,
the fused-vs-reference correctness check (three `qtrain pretrain` runs), the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


@pytest.mark.timeout(420)
def test_smoke_run_writes_table_and_results(tmp_path):
    only = "qtrain smoke mbs1,hf_fp32master,correctness"
    env = dict(os.environ, QTRAIN_BENCH_SCRATCH=str(tmp_path / "scratch"), QTRAIN_DEVICE="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--smoke", "--only", only, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=410, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"qtrain smoke mbs1", "hf_fp32master s64", "correctness smoke"}
    assert all(r["status"] == "ok" for r in rows.values()), [(n, r.get("error")) for n, r in rows.items()]
    q = rows["qtrain smoke mbs1"]
    assert q["tokens_per_s"] > 0 and q["step_s"] > 0
    # The figures are the command's own: its metrics.jsonl, one record per warm-up-long window.
    records = [json.loads(line) for line in Path(q["metrics"]).read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and q["iterations"] == 3
    timed = [r["tokens_per_s_per_device"] for r in records[1:]]
    assert q["tokens_per_s"] == round(len(timed) / sum(1 / t for t in timed))
    assert rows["hf_fp32master s64"]["tokens_per_s"] > 0
    check = rows["correctness smoke"]
    # On the CPU both paths are the reference: identical curves, and the loss falls.
    assert len(check["loss_reference"]) == check["iters"] == 4
    assert check["loss_fused"] == check["loss_reference"] and check["max_abs_loss_diff"] == 0.0
    assert check["loss_reference"][-1] < check["loss_reference"][0]
    assert check["loss_ok"] and check["first_loss_ok"]
    # fp32 and bf16 start from the same weights: the first losses differ by bf16 rounding only.
    assert 0 < check["first_loss_err_vs_fp32"]["reference"] < 0.05
    assert set(check["ops"]["fused"].values()) == {"reference"}
    md = (tmp_path / "results.md").read_text()
    assert "| qtrain smoke mbs1 | smoke | 1 | 64 |" in md and "correctness smoke: max |loss diff|" in md
    assert (tmp_path / "log.txt").read_text().count("=====") == 3


def test_no_training_step_in_benchmarks():
    """The benchmark measures the command: the throughput script runs no forward/backward of its own,
    and nothing under benchmarks/ steps an optimizer (the anchors, copies of ../shared's HF baseline,
    are the comparison, not qtrain). Op-level memory benchmarks may call one op's backward."""
    assert ".backward(" not in SCRIPT.read_text()
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert "optimizer.step(" not in path.read_text() and ".step()" not in path.read_text(), path


def test_worker_reports_failures_as_rows():
    """A broken config becomes a row with its error, not a crash of the whole call."""
    cfg = {"kind": "qtrain", "name": "bad", "model": "no-such-model", "seq": 8, "mbs": 1, "compile": False,
           "ops": "auto", "recompute": None, "warmup": 1, "steps": 1}
    proc = subprocess.run([sys.executable, str(SCRIPT), "worker", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert proc.returncode == 0 and result["status"] == "error" and "no-such-model" in result["error"]


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oom_halves_mbs_and_broken_compile_falls_back(tmp_path, monkeypatch):
    """The orchestrator's recovery, with stand-in runs: an OOM is kept and retried at half the MBS;
    a failing compiled run is retried eager, and later rows stay eager; 'best' picks the fastest."""
    tt = _load_script()
    plan = [tt._qtrain("q mbs4", model="smoke", mbs=4), tt._qtrain("q mbs1", model="smoke", mbs=1),
            tt._qtrain("q best", model="smoke", mbs="best")]
    monkeypatch.setattr(tt, "smoke_plan", lambda tokens: [dict(c) for c in plan])
    seen = []

    def fake_run(c, timeout, log):
        seen.append((c["name"], c["mbs"], c["compile"]))
        if c["mbs"] == 4:
            return dict(status="OOM", error="CUDA out of memory")
        if c["compile"]:
            return dict(status="error", error="InductorError")
        return dict(status="ok", tokens_per_s=100 * c["mbs"], step_s=1.0)

    monkeypatch.setattr(tt, "_run_one", fake_run)
    assert tt.main(["run", "--smoke", "--out", str(tmp_path)]) == 0
    assert seen == [("q mbs4", 4, True), ("q mbs4 -> mbs2", 2, True), ("q mbs4 -> mbs2 (compile=False)", 2, False),
                    ("q mbs1", 1, False), ("q best", 2, False)]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["OOM", "error", "ok", "ok", "ok"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["degraded"] == {"compile": False}
