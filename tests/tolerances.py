"""Float comparisons whose tolerance follows the values' scale and the number of terms summed.

Entrywise `allclose(rtol, atol)` fails on entries near zero: their absolute rounding error is set by
the larger values they were computed from, not by their own size, and it depends on the summation
order, which differs between CPUs (SIMD width, thread count). So tests compare the largest error with
the largest value,

    max |actual - expected| <= tol * max |expected|,

with tol set from the computation: the rounding error of a float32 sum of n terms grows like
sqrt(n) * eps (a random walk; n * eps at worst), and the stages of a computation (a matmul over the
hidden size, a softmax over the vocabulary, a gradient summed over tokens) add their independent
errors, so the walk's length is the sum of the stages' term counts. Exact properties (ignored tokens get no gradient, a bug of 1e-3 is caught) are asserted separately.
Imported as `from tolerances import ...` (pytest puts tests/ on sys.path for tests/conftest.py).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
# Headroom over eps * sqrt(terms). Measured against float64 (2026-12-01, three ATen CPU code paths:
# AVX-512, AVX2, generic): the largest errors were 0.66 of eps * sqrt(terms) for the LM-head loss
# test (480 seeds x chunkings; the failure reported from another CPU was 0.7), 0.06-0.17 for the
# Qwen3 parity tests' logits and gradients. 2 leaves 3x and more, and still catches one weight off by
# 1e-3 in every parity test (tests/ops/test_linear_cross_entropy.py checks this for the LM head).
SLACK = 2.0


def fp32_tol(*terms: int) -> float:
    """Relative tolerance for float32 results computed through stages that each sum `terms[i]` values
    (e.g. fp32_tol(hidden, vocab, tokens) for an LM-head weight gradient)."""
    return SLACK * EPS32 * math.sqrt(max(sum(terms), 1))


def qwen3_terms(cfg, seq: int, tokens: int = 0, backward: bool = False) -> tuple[int, ...]:
    """The float32 sums along a Qwen3 forward pass (cfg: a Qwen3Config), for fp32_tol: per layer the
    input norm, the q/k/v projections, q/k norms, attention scores and their softmax-weighted sum over
    `seq`, the output projection, the post-attention norm, gate/up and down projections; then the
    final norm and the LM head. tokens > 0: the loss as well (softmax over the vocabulary, mean over
    the tokens). backward=True: the backward pass sums as much again, and each weight gradient also
    sums over the tokens."""
    h, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    layer = (h, h, cfg.head_dim, cfg.head_dim, seq, q, h, h, cfg.intermediate_size)
    terms = layer * cfg.num_hidden_layers + (h, h)
    if tokens:
        terms += (cfg.vocab_size, tokens)
    return terms * 2 + (tokens,) if backward else terms


def scaled_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close_scaled(actual, expected, *, terms: Iterable[int] = (), rel: float | None = None,
                        what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected|, with tol = `rel` if given, else fp32_tol(*terms).

    Give `rel` only where the difference is not float32 rounding of a sum (e.g. bf16 storage), and say why.
    """
    tol = rel if rel is not None else fp32_tol(*terms)
    err = scaled_error(actual, expected)
    assert err <= tol, f"{what or 'values'}: max error {err:.3g} x max|expected| exceeds {tol:.3g}"


def assert_bf16_close(fused: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """A bf16 result `fused` is within bf16 rounding: measured against a float32 evaluation `exact` of
    the same inputs, it is as close as the bf16 reference `ref` is (mean error within 1.25x, max
    error within 2x, plus half a bf16 ulp of the typical magnitude)."""
    e_fused = (fused.float() - exact.float()).abs()
    e_ref = (ref.float() - exact.float()).abs()
    hair = 2**-9 * exact.float().abs().mean()  # half a bf16 ulp of the typical magnitude
    assert e_fused.mean() <= 1.25 * e_ref.mean() + hair, f"{what}: mean err {e_fused.mean():.3g} vs {e_ref.mean():.3g}"
    assert e_fused.max() <= 2.0 * e_ref.max() + hair, f"{what}: max err {e_fused.max():.3g} vs {e_ref.max():.3g}"
