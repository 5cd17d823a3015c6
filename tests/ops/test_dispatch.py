"""Op dispatch: QTRAIN_OPS parsing, per-device choice, backend() report, routing, fallbacks."""

import logging
import sys
import types

import pytest
import torch

from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import build_model
from qtrain.parallel.weights import materialize
from qtrain.ops import dispatch
from qtrain.ops.linear_cross_entropy import linear_cross_entropy
from qtrain.ops.rmsnorm import rms_norm, rms_norm_reference
from qtrain.ops.rope import apply_rope_qk, apply_rope_reference
from qtrain.ops.swiglu import swiglu, swiglu_reference

ALL_LIGER = dict.fromkeys(dispatch.OPS, "liger")
ALL_REF = dict.fromkeys(dispatch.OPS, "reference")


@pytest.fixture(autouse=True)
def restore_table():
    yield
    dispatch.configure()


def test_parse_spec():
    assert dispatch.parse_spec("auto") == {} and dispatch.parse_spec("") == {}
    assert dispatch.parse_spec("reference") == ALL_REF
    assert dispatch.parse_spec(" rope=reference, swiglu=auto ") == {"rope": "reference"}
    for bad in ("fast", "rope=triton", "attention=liger", "rope"):
        with pytest.raises(ValueError, match="QTRAIN_OPS"):
            dispatch.parse_spec(bad)


def test_resolve_per_device():
    have = {"liger": True, "npu": True}
    assert dispatch.resolve("cuda", {}, have) == ALL_LIGER
    assert dispatch.resolve("npu", {}, have) == {**dict.fromkeys(dispatch.OPS, "npu"), "linear_cross_entropy": "reference"}
    assert dispatch.resolve("cpu", {}, have) == ALL_REF  # the CPU never leaves the reference
    assert dispatch.resolve("cpu", dispatch.parse_spec("liger"), have) == ALL_REF
    assert dispatch.resolve("cuda", dispatch.parse_spec("reference"), have) == ALL_REF
    mixed = dispatch.resolve("cuda", dispatch.parse_spec("rms_norm=reference"), have)
    assert mixed == {**ALL_LIGER, "rms_norm": "reference"}


def test_resolve_falls_back_without_liger_unless_forced():
    missing = {"liger": False, "npu": False}
    assert dispatch.resolve("cuda", {}, missing) == ALL_REF
    with pytest.raises(ValueError, match="pip install liger-kernel"):
        dispatch.resolve("cuda", dispatch.parse_spec("liger"), missing)


def test_backend_report_on_cpu(monkeypatch):
    assert dispatch.backend("cpu") == ALL_REF
    monkeypatch.setenv("QTRAIN_OPS", "reference")
    dispatch.configure()
    assert dispatch.backend("cpu") == ALL_REF and dispatch.backend("cuda") == ALL_REF
    monkeypatch.setenv("QTRAIN_OPS", "bogus")
    with pytest.raises(ValueError, match="QTRAIN_OPS='bogus'"):
        dispatch.configure()


def test_broken_liger_install_falls_back_with_a_warning(monkeypatch, caplog):
    """CUDA present, liger_kernel found but failing to import: auto uses the reference, a forced
    'liger' is an error naming the fix."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        real_find_spec = dispatch.importlib.util.find_spec
        m.setattr(dispatch.importlib.util, "find_spec",
                  lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a))
        m.setitem(sys.modules, "liger_kernel", None)  # import raises ImportError
        m.setattr(dispatch, "_LIGER", None)
        with caplog.at_level(logging.INFO, logger="qtrain.ops"):
            table = dispatch.configure("auto")
        assert table["cuda"] == ALL_REF
        assert "failed to import" in caplog.text and "rms_norm=reference" in caplog.text
        assert dispatch.backend("cuda") == ALL_REF
        with pytest.raises(ValueError, match="liger"):
            dispatch.configure("liger")


def _fake_liger(calls: list) -> types.SimpleNamespace:
    """Stand-ins for liger_kernel.ops that record the call and compute the reference."""

    def fn(name, compute):
        return types.SimpleNamespace(apply=lambda *a: (calls.append(name), compute(*a))[1])

    def flce(h, w, y, bias, ce_w, ignore, *rest):
        return (torch.nn.functional.cross_entropy((h @ w.t()).float(), y, ignore_index=ignore, reduction="sum"),)

    return types.SimpleNamespace(
        LigerRMSNormFunction=fn("rms_norm", lambda x, w, eps, *rest: rms_norm_reference(x, w, eps)),
        LigerRopeFunction=fn("rope", lambda q, k, c, s: (apply_rope_reference(q, c, s), apply_rope_reference(k, c, s))),
        LigerSiLUMulFunction=fn("swiglu", swiglu_reference),
        LigerFusedLinearCrossEntropyFunction=fn("linear_cross_entropy", flce),
    )


def test_ops_route_to_the_chosen_library(monkeypatch):
    """With 'liger' in the table for this device, every op calls Liger; mixed dtypes stay on the reference."""
    calls: list = []
    monkeypatch.setattr(dispatch, "_LIGER", _fake_liger(calls))
    monkeypatch.setitem(dispatch._TABLE, "cpu", dict(ALL_LIGER))
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    q, k, cos, sin = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    apply_rope_qk(q, k, cos, sin)
    swiglu(x, x)
    linear_cross_entropy(x, torch.randn(11, 8), torch.randint(0, 11, (2, 3)))
    assert calls == ["rms_norm", "rope", "swiglu", "linear_cross_entropy"]
    rms_norm(x.bfloat16(), w, 1e-6)  # bf16 activations with an fp32 weight (autocast): reference
    assert calls[-1] == "linear_cross_entropy"


def test_cpu_results_do_not_depend_on_the_choice():
    """QTRAIN_OPS=auto and =reference give bit-identical logits and loss on the CPU."""
    cfg = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = materialize(build_model(cfg, "meta"), "cpu", seed=0)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    out = {}
    for spec in ("auto", "reference"):
        with dispatch.using(spec):
            out[spec] = (model(ids), model(ids, labels=ids))
    assert torch.equal(out["auto"][0], out["reference"][0]) and torch.equal(out["auto"][1], out["reference"][1])


def test_compiled_code_keeps_elementwise_ops_on_the_reference(monkeypatch):
    """auto: inside torch.compile the element-wise ops take the reference (inductor fuses it) and the
    fused loss keeps Liger; an explicit QTRAIN_OPS=liger keeps Liger everywhere."""
    calls: list = []
    monkeypatch.setattr(dispatch, "_LIGER", _fake_liger(calls))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        dispatch.configure("auto")
        assert dispatch.backend("cuda") == ALL_LIGER
        assert dispatch.backend("cuda", compiled=True) == {**ALL_REF, "linear_cross_entropy": "liger"}
        dispatch.configure("liger")
        assert dispatch.backend("cuda", compiled=True) == ALL_LIGER

    # The lookup itself, traced by dynamo: route the CPU like CUDA's auto tables.
    dispatch.configure("auto")
    monkeypatch.setitem(dispatch._TABLE, "cpu", dict(ALL_LIGER))
    monkeypatch.setitem(dispatch._COMPILED_TABLE, "cpu", {**ALL_REF, "linear_cross_entropy": "liger"})
    x, w = torch.randn(4, 8), torch.randn(8)
    torch._dynamo.reset()
    out = torch.compile(rms_norm, backend="eager", fullgraph=True)(x, w, 1e-6)
    assert calls == [] and torch.allclose(out, rms_norm_reference(x, w, 1e-6))
    rms_norm(x, w, 1e-6)
    assert calls == ["rms_norm"]


def test_npu_paths_route_to_torch_npu(monkeypatch):
    """Stand-ins with torch_npu's signatures: npu_rms_norm(x, w, epsilon) -> (y, rstd),
    npu_rotary_mul(x, cos[B,1,S,D], sin), npu_swiglu(cat(gate, up), dim) = silu(first half) * second."""
    calls: list = []

    def rms(x, w, epsilon):
        calls.append("rms_norm")
        return rms_norm_reference(x, w, epsilon), None

    def rot(x, c, s):
        calls.append("rope")
        assert c.dim() == 4 and c.shape[1] == 1
        return x * c + torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1) * s

    def glu(x, dim):
        calls.append("swiglu")
        a, b = x.chunk(2, dim=dim)
        return torch.nn.functional.silu(a) * b

    monkeypatch.setattr(dispatch, "_NPU", types.SimpleNamespace(npu_rms_norm=rms, npu_rotary_mul=rot, npu_swiglu=glu))
    assert dispatch.resolve("npu", {}, {"npu": True}) == {**dict.fromkeys(dispatch.OPS, "npu"),
                                                          "linear_cross_entropy": "reference"}
    monkeypatch.setitem(dispatch._TABLE, "cpu", dispatch.resolve("npu", {}, {"npu": True}))
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    assert torch.allclose(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    got_q, got_k = apply_rope_qk(q, k, cos, sin)
    assert torch.allclose(got_q, apply_rope_reference(q, cos, sin)) and torch.allclose(got_k, apply_rope_reference(k, cos, sin))
    assert torch.allclose(swiglu(x, x * 2), swiglu_reference(x, x * 2))
    assert calls == ["rms_norm", "rope", "rope", "swiglu"]
