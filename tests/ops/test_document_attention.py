"""Document-masked attention (qtrain/ops/document_attention.py): a pack of documents trains exactly
like its documents one by one, without a dense [S, S] mask."""

import pytest
import torch

from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import build_model
from qtrain.ops.attention import attention
from qtrain.ops.document_attention import Documents, document_attention, sample_cu_seqlens
from tolerances import assert_close_scaled, fp32_tol, qwen3_terms

CFG = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=512)


def random_lengths(n_docs: int, gen: torch.Generator, lo: int = 1, hi: int = 9) -> list[int]:
    return torch.randint(lo, hi, (n_docs,), generator=gen).tolist()


def bounds_row(lengths: list[int], seq: int) -> torch.Tensor:
    starts = torch.zeros(seq, dtype=torch.bool)
    starts[torch.tensor([0] + lengths[:-1]).cumsum(0)] = True
    return sample_cu_seqlens(starts)


def test_sample_cu_seqlens_and_batch_stream():
    starts = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    row = sample_cu_seqlens(starts)
    assert row.tolist() == [0, 3, 5, 8, 8, 8, 8, 8, 8]
    starts[0] = False  # position 0 always starts a document
    assert sample_cu_seqlens(starts).tolist() == row.tolist()
    docs = Documents.from_sample_bounds(torch.stack([row, sample_cu_seqlens(torch.zeros(8, dtype=torch.bool))]))
    assert docs.bounds == (0, 3, 5, 8, 16) and docs.max_len == 8
    assert docs.cu_seqlens.dtype == torch.int32 and docs.cu_seqlens.tolist() == list(docs.bounds)


@pytest.mark.parametrize("n_docs", [1, 3, 20])
def test_equals_dense_block_causal_mask(n_docs):
    """Outputs and input gradients equal SDPA with the dense block-diagonal causal mask (GQA)."""
    gen = torch.Generator().manual_seed(n_docs)
    rows, seq = [], 0
    lengths = [random_lengths(n_docs, gen), random_lengths(max(1, n_docs // 2), gen)]
    seq = max(sum(x) for x in lengths) + 3  # the shorter sample ends in one longer "document" (padding)
    rows = torch.stack([bounds_row(x, seq) for x in lengths])
    q, k, v = (torch.randn(2, h, seq, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
    docs = Documents.from_sample_bounds(rows)
    out = attention(q, k, v, docs=docs)
    doc_id = torch.stack([torch.searchsorted(r[1:], torch.arange(seq), right=True) for r in rows])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = (doc_id[:, :, None] == doc_id[:, None, :]) & causal
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = attention(q2, k2, v2, mask[:, None])
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    ref.backward(g)
    tol = fp32_tol(8, seq, seq)
    assert_close_scaled(out, ref, rel=tol, what="output")
    for a, b, name in ((q, q2, "dq"), (k, k2, "dk"), (v, v2, "dv")):
        assert_close_scaled(a.grad, b.grad, rel=tol, what=name)


def model_and_copy():
    torch.manual_seed(0)
    model = build_model(CFG, "cpu")
    model.init_weights(std=0.2)
    return model


@pytest.mark.parametrize("n_docs", [1, 2, 7, 20])
def test_pack_trains_like_its_documents_alone(n_docs, one_thread):
    """Per-document losses and the weight gradients of a pack (documents + per-document positions)
    equal running each document alone, fp32."""
    gen = torch.Generator().manual_seed(100 + n_docs)
    lengths = random_lengths(n_docs, gen, 2, 12)
    seq = sum(lengths) + 2
    ids = torch.randint(0, CFG.vocab_size, (1, seq), generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (1, seq), generator=gen)
    labels[0, sum(lengths):] = -100  # the padding tail trains nothing
    starts = torch.zeros(seq, dtype=torch.bool)
    offsets = [0] + torch.tensor(lengths).cumsum(0).tolist()
    starts[offsets[:-1]] = True
    starts[offsets[-1]] = True  # padding: a document of its own
    positions = torch.cat([torch.arange(n) for n in lengths + [seq - offsets[-1]]])[None]

    model = model_and_copy()
    per_token = model(ids, position_ids=positions, labels=labels, loss_reduction="none",
                      cu_seqlens=sample_cu_seqlens(starts)[None])
    packed_losses = [per_token[0, lo:hi].sum() for lo, hi in zip(offsets[:-1], offsets[1:])]
    torch.stack(packed_losses).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    alone_losses = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        loss = model(ids[:, lo:hi], labels=labels[:, lo:hi], loss_reduction="sum")
        loss.backward()
        alone_losses.append(loss.detach())
    terms = qwen3_terms(CFG, max(lengths), tokens=seq, backward=True)
    assert_close_scaled(torch.stack(packed_losses), torch.stack(alone_losses), terms=terms, what="losses")
    for name, p in model.named_parameters():
        assert_close_scaled(packed_grads[name], p.grad, terms=terms, what=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_paths_equal_reference(dtype):
    """CUDA: variable-length flash attention (bf16) or the per-document loop (fp32) equals the CPU
    reference in float32 (output and q/k/v gradients), within the dtype's rounding."""
    gen = torch.Generator().manual_seed(0)
    lengths = [100, 1, 300, 57, 566]
    seq = sum(lengths)
    rows = bounds_row(lengths, seq)[None]
    q, k, v = (torch.randn(1, h, seq, 128, generator=gen, requires_grad=True) for h in (16, 8, 8))
    g = torch.randn(1, 16, seq, 128, generator=gen)
    exact = document_attention(q, k, v, Documents.from_sample_bounds(rows))  # the reference on CPU
    exact.backward(g)
    qc, kc, vc = (x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v))
    out = document_attention(qc, kc, vc, Documents.from_sample_bounds(rows, torch.device("cuda")))
    out.backward(g.to("cuda", dtype))
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert_close_scaled(out.float().cpu(), exact, rel=rel, what=f"{dtype} output")
    for a, b, name in ((qc, q, "dq"), (kc, k, "dk"), (vc, v, "dv")):
        assert_close_scaled(a.grad.float().cpu(), b.grad, rel=rel, what=f"{dtype} {name}")
