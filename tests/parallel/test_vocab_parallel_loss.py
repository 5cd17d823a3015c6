"""The vocab-parallel chunked LM-head loss on 2 ranks (gloo) equals full-logits cross-entropy in
value and in the gradients of the hidden states and of each rank's weight shard: tiny vocabulary,
several chunks with an uneven tail, ignored labels, hidden states replicated or sequence-sharded; and
per token (reduction "none", preference training) with a per-token upstream gradient."""

import subprocess
import sys
from pathlib import Path

import pytest

from parallel_helpers import free_port, worker_env

WORKER = Path(__file__).with_name("vocab_parallel_loss_worker.py")


@pytest.mark.timeout(300)
def test_vocab_parallel_loss_and_gradients_equal_full_logits():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER)]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in ("replicated", "sequence_sharded", "per-token replicated", "per-token sequence_sharded"):
        assert proc.stdout.count(f"ok {case}") == 2, proc.stdout  # on both ranks
