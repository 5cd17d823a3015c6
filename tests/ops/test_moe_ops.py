"""Grouped expert matmul: torch._grouped_mm (the CUDA path, which torch also runs on the CPU)
equals the per-expert reference in fp32, forward and backward, with empty experts; the
permutation round trip is exact."""

import pytest
import torch

from qtrain.ops import dispatch
from qtrain.ops.moe import (grouped_mm, grouped_mm_padded, grouped_mm_reference, grouped_mm_torch, permute, route,
                            unpermute)
from tolerances import assert_close_scaled

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")


def _inputs(counts, k_in=24, n_out=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), k_in, generator=g, requires_grad=True)
    w = torch.randn(len(counts), n_out, k_in, generator=g, requires_grad=True)
    return x, w, counts


@needs_grouped_mm
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [4, 4, 4, 4]])
def test_grouped_mm_equals_reference_fp32(counts):
    x, w, c = _inputs(counts)
    ref = grouped_mm_reference(x, w, c)
    gx, gw = torch.autograd.grad(ref.sum() * 1.5, (x, w))  # a broadcast (zero-stride) gradient
    got = grouped_mm_torch(x, w, c)
    tx, tw = torch.autograd.grad(got.sum() * 1.5, (x, w))
    assert_close_scaled(got, ref, terms=(24,), what="forward")
    assert_close_scaled(tx, gx, terms=(16,), what="grad x")
    assert_close_scaled(tw, gw, terms=(max(counts),), what="grad w")
    assert torch.all(tw[torch.tensor(counts) == 0] == 0)  # an expert without tokens gets no gradient


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0]])
def test_padded_fallback_equals_reference_fp32(counts):
    x, w, c = _inputs(counts)
    ref = grouped_mm_reference(x, w, c)
    gx, gw = torch.autograd.grad(ref.sum(), (x, w))
    got = grouped_mm_padded(x, w, c)
    tx, tw = torch.autograd.grad(got.sum(), (x, w))
    assert_close_scaled(got, ref, terms=(24,), what="forward")
    assert_close_scaled(tx, gx, terms=(16,), what="grad x")
    assert_close_scaled(tw, gw, terms=(max(counts),), what="grad w")


def test_cpu_dispatch_takes_the_reference():
    assert dispatch.grouped_mm_impl(torch.device("cpu")) == "reference"
    x, w, c = _inputs([2, 3])
    assert torch.equal(grouped_mm(x, w, c), grouped_mm_reference(x, w, c))


def test_route_permute_unpermute():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=g)
    weights, experts, probs = route(logits, 2, renormalise=True)
    assert torch.allclose(weights.sum(-1), torch.ones(7)) and torch.allclose(probs.sum(-1), torch.ones(7))
    x = torch.randn(7, 3, generator=g)
    x_sorted, counts, order = permute(x, experts, 5)
    assert counts.tolist() == torch.bincount(experts.reshape(-1), minlength=5).tolist()
    sorted_experts = experts.reshape(-1)[order]
    assert torch.equal(sorted_experts, torch.sort(sorted_experts).values)
    # identity experts: the weighted sum of a token's copies is the token (weights sum to 1)
    assert torch.allclose(unpermute(x_sorted, weights, order, 7), x, atol=1e-6)
