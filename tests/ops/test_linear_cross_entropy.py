"""The chunked LM-head cross-entropy equals logits + cross_entropy, in value and in gradients."""

import pytest
import torch

from qtrain.ops.cross_entropy import cross_entropy
from qtrain.ops.linear_cross_entropy import linear_cross_entropy
from tolerances import assert_close_scaled, fp32_tol, scaled_error

# float32 rounding: logits sum over the hidden size (16), the softmax over the vocabulary (97),
# the weight gradient over the tokens (63).
TERMS = (16, 97, 63)


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
    assert_close_scaled(got, ref, terms=TERMS, what="loss")
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    loss = linear_cross_entropy(h32, w32, y, reduction=reduction, chunk_size=chunk)
    (2.5 * loss).backward()  # a non-unit upstream gradient is applied
    assert_close_scaled(h32.grad, 2.5 * gh, terms=TERMS, what="grad h")
    assert_close_scaled(w32.grad, 2.5 * gw, terms=TERMS, what="grad w")
    assert h32.grad[0, :5].abs().max() == 0  # ignored tokens get no gradient


def test_the_tolerance_catches_a_small_bug():
    """One weight off by 1e-3 moves both gradients past the float32 tolerance above (the summed loss
    moves by ~1e-6 of itself, as much as float32 rounding: it cannot show a bug this small)."""
    torch.manual_seed(1)
    h = torch.randn(63, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 97, (63,))
    cross_entropy(h @ w.t(), y, reduction="sum").backward()
    w_bad = w.detach().clone()
    w_bad[int(y[0]), 3] += 1e-3  # a weight the loss depends on
    h32, w32 = h.detach().float().requires_grad_(), w_bad.float().requires_grad_()
    linear_cross_entropy(h32, w32, y, reduction="sum", chunk_size=7).backward()
    for got, want in ((h32.grad, h.grad), (w32.grad, w.grad)):
        assert scaled_error(got, want) > 3 * fp32_tol(*TERMS)


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
    assert_close_scaled(got, ref, rel=1e-2, what="bf16 loss")  # bf16 inputs: 2^-8 per rounded value
