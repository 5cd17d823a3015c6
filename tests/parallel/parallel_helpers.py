"""Launch the parallel test worker (torchrun on CPU/gloo) and read its results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("parallel_worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", QTRAIN_DEVICE="cpu", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_worker(tmp: Path, name: str, world: int, runs: list[dict], timeout: int = 400, worker: Path = WORKER) -> dict:
    """Run `runs` (one after another, in one process group of `world` ranks) in `worker` (default
    parallel_worker.py); {run name: result}."""
    spec = tmp / f"{name}.json"
    out = tmp / f"{name}_out.json"
    spec.write_text(json.dumps({"out": str(out), "runs": runs}))
    if world == 1:
        cmd = [sys.executable, str(worker), str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(worker), str(spec)]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
