"""qtrain's Liger-Kernel (CUDA) paths, run on the CPU by Triton's interpreter, against the reference.

`liger_interpreter_worker.py` runs in its own process with TRITON_INTERPRET=1 (set before triton is
imported, so nothing else in the suite runs interpreted). It gives CPU tensors the dispatch table qtrain
builds for CUDA with Liger installed, so the exact functions qtrain calls on a GPU run -- e.g.
`linear_cross_entropy` -> `_liger_loss_sum` -> `LigerFusedLinearCrossEntropyFunction` -- and compares
their outputs and input gradients with the reference path's on the same inputs, within float32
rounding (tests/tolerances.py).

What the interpreter runs (liger-kernel 0.8.5, triton 3.9.0, torch 2.13.0, 2026-12-01):

- fused linear cross-entropy (`ops/linear_cross_entropy.py`): loss and gradients, sum and mean, ignored
  labels: tested;
- RoPE on q and k (`ops/rope.py`, `LigerRopeFunction`, in the model's transposed layout): tested;
- the whole tiny model with those two on Liger (loss and every parameter's gradient): tested;
- RMSNorm (`ops/rmsnorm.py`, `LigerRMSNormFunction`) and SwiGLU (`ops/swiglu.py`, `LigerSiLUMulFunction`):
  NOT run by the interpreter. Their forward kernels call `.to()` on a float argument, which compiled
  Triton turns into a scalar tensor and the interpreter passes as a Python float:
  `InterpreterError: AttributeError("'float' object has no attribute 'to'")` at
  liger_kernel/ops/rms_norm.py:125 (`eps = eps.to(tl.float32)`) and liger_kernel/ops/swiglu.py:72
  (`gate_multiplier.to(tl.float32)`). These tests expect exactly that error (xfail); any other error
  fails them, and once a Liger release runs them they are compared like the others. They are
  checked on a GPU only (test_fused_ops_gpu.py);
- bf16: not tested here, because the interpreter's bf16 is not a GPU's: it converts float32 to bf16
  by truncation, not round-to-nearest (twice the error: Liger's bf16 loss gradients came out 2.1x
  the bf16 reference's mean error), and Liger's RoPE on bf16 inputs returned values near 1e38, NaN
  and inf. bf16 is checked on a GPU only (test_fused_ops_gpu.py).

Skipped when triton or liger-kernel is not installed (the dev extra installs both).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tolerances import assert_close_scaled, qwen3_terms

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("liger_kernel") is None,
    reason="needs triton and liger-kernel (pip install -e '.[dev]')")

WORKER = Path(__file__).with_name("liger_interpreter_worker.py")
INTERPRETER_LIMIT = "'float' object has no attribute 'to'"
# float32 sums behind each op's outputs and gradients: hidden size, vocabulary and tokens for the LM head;
# one rotation (2 terms) for RoPE.
TERMS = {"linear_cross_entropy": (32, 301, 24), "rope": (2,), "rms_norm": (32,), "swiglu": (1,)}
LIGER_FUNCTION = {"linear_cross_entropy": "LigerFusedLinearCrossEntropyFunction", "rope": "LigerRopeFunction",
                  "rms_norm": "LigerRMSNormFunction", "swiglu": "LigerSiLUMulFunction"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("liger") / "results.pt"
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out)


def _ran_or_xfail(result: dict, op: str) -> None:
    if "error" in result:
        if op in ("rms_norm", "swiglu") and INTERPRETER_LIMIT in result["error"]:
            pytest.xfail(f"Triton's interpreter cannot run Liger's {op} kernel: {result['error']}")
        pytest.fail(f"{op} on Liger failed: {result['error']}\n{result['traceback']}")
    assert LIGER_FUNCTION[op] in result["liger_calls"], result["liger_calls"]  # Liger ran, not the reference


@pytest.mark.parametrize("op", ["linear_cross_entropy-sum", "linear_cross_entropy-mean", "rope", "rms_norm", "swiglu"])
def test_liger_op_matches_reference(results, op):
    """Outputs and the gradients of both inputs, Liger (interpreted) vs reference, float32."""
    result = results[op]
    name = op.split("-")[0]
    _ran_or_xfail(result, name)
    (f_out, f_grads), (r_out, r_grads) = result["fused"], result["reference"]
    assert len(f_grads) == len(r_grads) == 2 and all(g is not None for g in f_grads)
    pairs = [(f"output {i}", f, r) for i, (f, r) in enumerate(zip(f_out, r_out))]
    pairs += [(f"grad {i}", f, r) for i, (f, r) in enumerate(zip(f_grads, r_grads))]
    for what, f, r in pairs:
        assert f.dtype == r.dtype == torch.float32
        assert_close_scaled(f, r, terms=TERMS[name], what=f"{op} {what}")


def test_model_loss_and_grads_with_liger_rope_and_loss(results):
    """The tiny model's loss and every parameter's gradient with Liger's RoPE and fused loss (the
    interpreter runs those two) equal the reference path's, in float32."""
    result = results["model"]
    _ran_or_xfail(result, "linear_cross_entropy")
    assert LIGER_FUNCTION["rope"] in result["liger_calls"]
    (f_loss, f_grads), (r_loss, r_grads) = result["fused"], result["reference"]
    terms = qwen3_terms(SimpleNamespace(**result["config"]), 10, tokens=18, backward=True)
    assert_close_scaled(f_loss[0], r_loss[0], terms=terms, what="loss")
    for name, f, r in zip(result["names"], f_grads, r_grads):
        assert_close_scaled(f, r, terms=terms, what=name)
