"""Expert parallelism on 2 ranks (gloo): tokens reach the experts' ranks by all-to-all and come back;
outputs and gradients equal the unsharded experts (expert_parallel_worker.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from parallel_helpers import free_port, worker_env

WORKER = Path(__file__).with_name("expert_parallel_worker.py")


@pytest.mark.timeout(300)
def test_expert_parallel_equals_unsharded_experts():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER)]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in ("uneven", "one rank sends nothing", "a rank receives nothing"):
        assert proc.stdout.count(f"ok {case}") == 2, proc.stdout
