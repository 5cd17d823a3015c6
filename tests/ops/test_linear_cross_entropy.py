"""The chunked LM-head cross-entropy equals logits + cross_entropy, in value and in gradients."""

import pytest
import torch

from qtrain.ops.cross_entropy import cross_entropy
from qtrain.ops.linear_cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference_in_float32(chunk, reduction):
    torch.manual_seed(chunk)
    h = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 97, (3, 21))
    y[0, :5] = -100  # ignored tokens (prompt positions in SFT)
    ref = cross_entropy(h @ w.t(), y, reduction=reduction)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h.float().detach().requires_grad_(), w.float().detach().requires_grad_(), y,
                               reduction=reduction, chunk_size=chunk)
    assert torch.allclose(got.double(), ref.double(), rtol=1e-5)
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    loss = linear_cross_entropy(h32, w32, y, reduction=reduction, chunk_size=chunk)
    (2.5 * loss).backward()  # a non-unit upstream gradient is applied
    assert torch.allclose(h32.grad.double(), 2.5 * gh.double(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(w32.grad.double(), 2.5 * gw.double(), rtol=1e-4, atol=1e-6)
    assert h32.grad[0, :5].abs().max() == 0  # ignored tokens get no gradient


def test_all_ignored_gives_zero_loss_and_grad():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bf16_close_to_float32():
    torch.manual_seed(0)
    h = torch.randn(64, 32)
    w = torch.randn(301, 32) * 0.1
    y = torch.randint(0, 301, (64,))
    ref = cross_entropy(h @ w.t(), y)
    got = linear_cross_entropy(h.bfloat16(), w.bfloat16(), y)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-2
