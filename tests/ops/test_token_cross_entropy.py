"""The chunked LM-head loss per token (reduction "none", preference training's log-probs) equals full logits
+ cross_entropy per token, and its recomputed backward gives the gradients of a per-token upstream gradient;
the summed loss is unchanged by the per-token path's existence (same values as before, tested elsewhere)."""

import pytest
import torch
import torch.nn.functional as F

from qtrain.ops.linear_cross_entropy import linear_cross_entropy
from tolerances import assert_close_scaled

TERMS = (16, 97, 63)  # hidden size, vocabulary, tokens (see test_linear_cross_entropy.py)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_per_token_values_and_gradients_match_full_logits(chunk):
    torch.manual_seed(chunk)
    h = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 97, (3, 21))
    y[0, :5] = -100
    upstream = torch.randn(3, 21, dtype=torch.float64)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 97), y.reshape(-1), reduction="none").view(3, 21)
    (ref * upstream).sum().backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    got = linear_cross_entropy(h32, w32, y, reduction="none", chunk_size=chunk)
    assert got.shape == (3, 21) and got.dtype == torch.float32 and got._base is None  # not a view (FSDP hooks)
    assert (got[0, :5] == 0).all()
    assert_close_scaled(got, ref, terms=TERMS, what="per-token loss")
    (got * upstream.float()).sum().backward()
    assert_close_scaled(h32.grad, h.grad, terms=TERMS, what="grad h")
    assert_close_scaled(w32.grad, w.grad, terms=TERMS, what="grad w")
    assert h32.grad[0, :5].abs().max() == 0


def test_per_token_sum_is_the_summed_loss_and_no_grad_needs_no_backward():
    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(97, 16)
    y = torch.randint(0, 97, (40,))
    tokens = linear_cross_entropy(h, w, y, reduction="none", chunk_size=9)
    total = linear_cross_entropy(h, w, y, reduction="sum", chunk_size=9)
    assert_close_scaled(tokens.sum(), total, terms=(16, 97, 40), what="sum")
    with torch.no_grad():
        assert not linear_cross_entropy(h.requires_grad_(), w, y, reduction="none").requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_peak_memory_is_the_plans_chunked_loss_term(monkeypatch, dtype):
    """Forward + recomputing backward allocate at their peak what `qtrain plan` counts for the per-token
    loss (one chunk's fp32 logits + its low-precision copy + grad hidden: working_bytes) plus the head
    gradient; the per-token outputs and log-sum-exps (16 bytes a token) are within the 1%."""
    import sys
    from pathlib import Path

    from qtrain.ops import vocab_parallel_linear_cross_entropy as vocab_parallel

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from cpu_peak_memory import cpu_peak_bytes

    vocab, hidden, batch, seq = 4096, 64, 2, 128
    monkeypatch.setattr(vocab_parallel, "CHUNK_LOGITS", 40 * vocab)  # 6 chunks of 40 tokens + 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :50] = -100
    upstream = torch.randn(batch, seq, generator=g)

    def forward_backward():
        (linear_cross_entropy(h, w, labels, reduction="none") * upstream).sum().backward()

    _, peak, _ = cpu_peak_bytes(forward_backward)
    b = h.element_size()
    expected = vocab_parallel.working_bytes(batch * seq, vocab, hidden, b) + vocab * hidden * b
    assert peak == pytest.approx(expected, rel=0.01)
