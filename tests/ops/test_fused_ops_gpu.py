"""The fused CUDA paths (Liger-Kernel, torch.compile) equal the reference within bf16 rounding.

"Within bf16 rounding": measured against a float32 evaluation of the same inputs, the fused result
is as close as the bf16 reference is (mean error within 1.25x, max error within 2x, plus half a
bf16 ulp of the typical magnitude).
Skipped without CUDA (conftest) and, for the Liger paths, without liger-kernel.
"""

import pytest
import torch

from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import build_model
from qtrain.ops import dispatch
from qtrain.ops.linear_cross_entropy import linear_cross_entropy
from qtrain.ops.rmsnorm import rms_norm
from qtrain.ops.rope import apply_rope_qk, rope_cos_sin
from qtrain.ops.swiglu import swiglu
from tolerances import assert_bf16_close

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(autouse=True)
def need_liger():
    pytest.importorskip("liger_kernel.ops")
    yield
    dispatch.configure()


def run(fn, spec: str, inputs: list[torch.Tensor], grad_out: list[torch.Tensor] | torch.Tensor, n_grad: int):
    """fn(*inputs) under QTRAIN_OPS=spec: outputs and the gradients of the first n_grad inputs
    (inputs are cloned: Liger's RoPE works in place)."""
    xs = [x.detach().clone().requires_grad_(i < n_grad) for i, x in enumerate(inputs)]
    with dispatch.using(spec):
        assert dispatch.backend("cuda") == dict.fromkeys(dispatch.OPS, "liger" if spec == "auto" else "reference")
        out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    gos = grad_out if isinstance(grad_out, list) else [grad_out]
    torch.autograd.backward(outs, gos)
    return [o.detach() for o in outs], [x.grad for x in xs if x.requires_grad]


def check(fn, inputs, grad_out, what, n_grad=2):
    f_out, f_grads = run(fn, "auto", inputs, grad_out, n_grad)
    r_out, r_grads = run(fn, "reference", inputs, grad_out, n_grad)
    x32 = [x.float() if x.is_floating_point() else x for x in inputs]
    g32 = [g.float() for g in grad_out] if isinstance(grad_out, list) else grad_out.float()
    e_out, e_grads = run(fn, "reference", x32, g32, n_grad)
    assert len(f_grads) == len(r_grads) == len(e_grads) == n_grad
    for i, (f, r, e) in enumerate(zip(f_out, r_out, e_out)):
        assert_bf16_close(f, r, e, f"{what} output {i}")
    for i, (f, r, e) in enumerate(zip(f_grads, r_grads, e_grads)):
        assert_bf16_close(f, r, e, f"{what} grad {i}")


def test_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 512, 2048, device=DEV, dtype=torch.bfloat16) * 3
    w = (1 + 0.1 * torch.randn(2048, device=DEV)).bfloat16()
    check(lambda a, b: rms_norm(a, b, 1e-6), [x, w], torch.randn_like(x), "rms_norm")


def test_rope_q_and_k():
    torch.manual_seed(0)
    b, s, d = 2, 1024, 128
    q = torch.randn(b, s, 16, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2)  # the model's layout
    k = torch.randn(b, s, 8, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    pos = torch.arange(s, device=DEV).expand(b, -1)
    cos, sin = rope_cos_sin(pos, d, 1e6, torch.bfloat16)

    def fn(q_, k_, c_, s_):  # `* 1`: a non-leaf with the same layout (Liger rotates in place)
        return apply_rope_qk(q_ * 1, k_ * 1, c_, s_)

    check(fn, [q, k, cos, sin], [torch.randn_like(q), torch.randn_like(k)], "rope")


def test_swiglu():
    torch.manual_seed(0)
    gate = torch.randn(4, 512, 6144, device=DEV, dtype=torch.bfloat16) * 2
    up = torch.randn_like(gate)
    check(swiglu, [gate, up], torch.randn_like(gate), "swiglu")


def test_linear_cross_entropy():
    torch.manual_seed(0)
    h = torch.randn(4096, 2048, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(151936, 2048, device=DEV) * 0.02).bfloat16()
    y = torch.randint(0, 151936, (4096,), device=DEV)
    y[:300] = -100
    check(lambda a, b, t: linear_cross_entropy(a, b, t), [h, w, y], torch.tensor(1.7, device=DEV), "linear CE")


SMALL = Qwen3Config(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)


def _model_and_truth():
    torch.manual_seed(0)
    model = build_model(SMALL, DEV)
    model.init_weights(generator=torch.Generator(device=DEV).manual_seed(0))
    ids = torch.randint(0, SMALL.vocab_size, (2, 1024), device=DEV, generator=torch.Generator(device=DEV).manual_seed(1))
    with dispatch.using("reference"), torch.no_grad():
        truth_logits, truth_loss = model(ids).float(), model(ids, labels=ids).float()
    return model.bfloat16(), ids, truth_logits, truth_loss


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_logits_and_loss_fused_vs_reference(compiled):
    """bf16 model: logits and fused loss with Liger (eager) or Liger + compiled layers, vs the reference."""
    model, ids, truth_logits, truth_loss = _model_and_truth()
    got = {}
    for spec in ("reference", "auto"):
        with dispatch.using(spec), torch.no_grad():
            if compiled and spec == "auto":
                for layer in model.model.layers.values():
                    layer.compile()
            got[spec] = (model(ids).float(), model(ids, labels=ids).float())
    assert_bf16_close(got["auto"][0], got["reference"][0], truth_logits, "logits")
    assert abs(got["auto"][1] - truth_loss) <= 2 * abs(got["reference"][1] - truth_loss) + 5e-3
    assert (got["auto"][0].argmax(-1) == got["reference"][0].argmax(-1)).float().mean() > 0.99
