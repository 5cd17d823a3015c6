"""qtrain plan: the activation and loss formulas against the bytes a real layer and the real loss
keep and allocate (CPU), the estimate's arithmetic, layout suggestions and the CLI."""

import gc
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from qtrain.config import PretrainConfig
from qtrain.models.config import Qwen3Config
from qtrain.models.presets import get_preset
from qtrain.models.qwen3 import build_model
from qtrain.ops import dispatch
from qtrain.ops import vocab_parallel_linear_cross_entropy as vocab_parallel
from qtrain.ops.linear_cross_entropy import linear_cross_entropy, loss_working_bytes
from qtrain.ops.rope import rope_cos_sin
from qtrain.parallel.plan import GIB, estimate_memory, final_norm_bytes, layer_activation_bytes, main, suggest_layouts
from qtrain.parallel.recompute import apply_recompute

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from cpu_peak_memory import cpu_peak_bytes  # noqa: E402

CFG = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)


class _Storages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
        return out


def saved_bytes_per_token(granularity, method=None, n=None, batch=2, seq=64) -> float:
    """Bytes a decoder layer keeps alive between its forward and backward (its input included):
    storages made during the forward that are still alive after it, less the output."""
    model = build_model(CFG, "cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    apply_recompute(model, granularity, method, n)
    layer = model.model.layers["0"]
    x = torch.randn(batch, seq, CFG.hidden_size, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(seq).expand(batch, -1), CFG.head_dim, CFG.rope_theta, x.dtype)
    existing = {t.untyped_storage().data_ptr() for t in [x, cos, sin, *model.parameters()]}
    mode = _Storages()
    with mode:
        y = layer(x, cos, sin)
    gc.collect()
    existing.add(y.untyped_storage().data_ptr())
    alive = {ptr: nbytes for ref, ptr, nbytes in mode.refs if not ref.expired() and ptr not in existing}
    y.sum().backward()  # the kept tensors do serve a backward
    return (sum(alive.values()) + x.numel() * 4) / (batch * seq)


@pytest.mark.parametrize("granularity, formula_mode", [(None, None), ("selective", "selective")])
def test_activation_formula_matches_the_bytes_a_layer_keeps(granularity, formula_mode):
    measured = saved_bytes_per_token(granularity)
    formula = layer_activation_bytes(CFG, 4, mode=formula_mode)
    assert measured == pytest.approx(formula, rel=0.01), (measured, formula)


def test_recompute_keeps_less():
    none, selective, full = (saved_bytes_per_token(None), saved_bytes_per_token("selective"),
                             saved_bytes_per_token("full", "uniform", 1))
    assert full == pytest.approx(layer_activation_bytes(CFG, 4, mode="full"), rel=0.01)
    assert full < selective < none


def test_last_stage_keeps_the_final_norm_and_the_loss_gradients_only():
    """Between forward and backward the last stage's final RMSNorm keeps what final_norm_bytes says
    and the chunked loss only its two gradients (not its input, not logits)."""
    model = build_model(CFG, "cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    batch, seq = 2, 64
    x = torch.randn(batch, seq, CFG.hidden_size, requires_grad=True)
    labels = torch.randint(0, CFG.vocab_size, (batch, seq))
    existing = {t.untyped_storage().data_ptr() for t in [x, *model.parameters()]}
    mode = _Storages()
    with mode:
        loss = linear_cross_entropy(model.model.norm(x), model.lm_head.weight, labels, reduction="sum")
    gc.collect()
    existing.add(loss.untyped_storage().data_ptr())
    alive = {ptr: nbytes for ref, ptr, nbytes in mode.refs if not ref.expired() and ptr not in existing}
    loss.backward()
    tokens = batch * seq
    expected = (tokens * final_norm_bytes(CFG, 4) + 4 * tokens * CFG.hidden_size  # + grad hidden
                + 4 * CFG.vocab_size * CFG.hidden_size)  # + the LM-head gradient
    assert sum(alive.values()) + x.numel() * 4 == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_term_is_the_peak_the_chunked_loss_allocates(monkeypatch, dtype):
    """The plan's loss term plus the LM-head gradient is the peak the loss's forward and backward
    allocate (the CPU allocator's own count, via the profiler): several chunks with an uneven tail
    and ignored labels. Its two gradients become .grad without a copy: exactly they remain."""
    vocab, hidden, batch, seq = 4096, 64, 2, 128
    monkeypatch.setattr(vocab_parallel, "CHUNK_LOGITS", 40 * vocab)  # 256 tokens: 6 chunks of 40 + 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :50] = -100

    def loss_forward_backward():
        linear_cross_entropy(h, w, labels, reduction="sum").backward()

    _, peak, end = cpu_peak_bytes(loss_forward_backward)
    b = h.element_size()
    loss_term, path = loss_working_bytes(batch * seq, vocab, hidden, b, device_type="cpu")
    assert path.startswith("chunked, 40 tokens per chunk")
    assert peak == pytest.approx(loss_term + vocab * hidden * b, rel=0.01)
    assert end - (h.grad.nbytes + w.grad.nbytes) in range(0, 64)  # the loss scalar


def test_seed_layout_loss_term_is_under_1_gib(monkeypatch):
    """Qwen3-1.7B, seq 4096, PP2, bf16 (the seed's layout): the last stage's loss was 6.96 GiB of
    logits; the chunked loss needs well under 1 GiB on every device, Liger's path on CUDA its fp32
    head-gradient accumulator more."""
    m = get_preset("1.7B")
    cfg = plan_cfg(gbs=32, pipeline_model_parallel_size=2, use_distributed_optimizer=True)
    for device in ("cpu", "npu", "cuda"):  # no Liger on this machine: the reference everywhere
        last = estimate_memory(m, cfg, 2, device_type=device, stage=-1)
        assert last.stage == 1 and 0.5 * GIB < last.loss < GIB and last.loss_path.startswith("chunked")
    assert estimate_memory(m, cfg, 2, device_type="cpu").total >= last.total  # the busiest stage
    monkeypatch.setitem(dispatch._TABLE, "cuda", {**dispatch.backend("cpu"), "linear_cross_entropy": "liger"})
    liger = estimate_memory(m, cfg, 2, device_type="cuda", stage=-1)
    assert liger.loss > 4 * m.vocab_size * m.hidden_size and liger.loss_path.startswith("Liger")
    tp2 = estimate_memory(m, plan_cfg(tensor_model_parallel_size=2, sequence_parallel=True), 2, device_type="cuda")
    assert tp2.loss < GIB and "vocab-parallel" in tp2.loss_path  # TP > 1: the reference, also on CUDA


def plan_cfg(seq=4096, mbs=1, gbs=None, bf16=True, **parallel) -> PretrainConfig:
    c = PretrainConfig()
    c.data.seq_length, c.training.micro_batch_size, c.training.global_batch_size = seq, mbs, gbs
    c.training.bf16 = bf16
    for k, v in parallel.items():
        setattr(c.parallel, k, v)
    return c


def test_states_are_16_bytes_per_parameter_sharded_by_fsdp():
    m = get_preset("1.7B")
    n = m.num_params
    one = estimate_memory(m, plan_cfg(), 1)
    fsdp8 = estimate_memory(m, plan_cfg(use_distributed_optimizer=True), 8)
    states = one.weights + one.grads + one.optimizer
    assert states == pytest.approx(16 * n, rel=1e-6)
    assert fsdp8.weights + fsdp8.grads + fsdp8.optimizer == pytest.approx(states / 8, rel=1e-6)
    assert fsdp8.activations == pytest.approx(one.activations)


def test_gradient_accumulation_keeps_unsharded_fp32_grads():
    """FSDP2 skips the reduce-scatter on all micro-batches but the last (train_step's
    set_requires_gradient_sync, the pipeline schedule's no-sync backward) and meanwhile keeps each
    parameter's whole gradient in the fp32 reduce dtype (FSDPParam.to_accumulated_grad_if_needed);
    the pipeline schedule also keeps the stage's weights gathered until its last backward."""
    m = get_preset("1.7B")
    n = m.num_params
    one_step = estimate_memory(m, plan_cfg(gbs=8, use_distributed_optimizer=True), 8)  # 1 micro-batch
    four = estimate_memory(m, plan_cfg(gbs=32, use_distributed_optimizer=True), 8)  # 4 micro-batches
    assert one_step.grads == pytest.approx(4 * n / 8, rel=1e-6)
    assert four.grads == pytest.approx(4 * n, rel=1e-6)
    assert four.weights == one_step.weights and four.optimizer == one_step.optimizer
    pp2 = estimate_memory(m, plan_cfg(gbs=8, pipeline_model_parallel_size=2), 2, stage=0)
    assert pp2.transient > 2 * n / 2 * 0.9  # bf16, about half the parameters on stage 0
    assert pp2.grads > 4 * n / 2 * 0.9


def test_parallelism_and_recompute_reduce_the_estimate():
    m = get_preset("8B")
    base = estimate_memory(m, plan_cfg(), 1)
    tp = estimate_memory(m, plan_cfg(tensor_model_parallel_size=2), 2)
    sp = estimate_memory(m, plan_cfg(tensor_model_parallel_size=2, sequence_parallel=True), 2)
    full = estimate_memory(m, plan_cfg(recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1), 1)
    block = estimate_memory(m, plan_cfg(recompute_granularity="full", recompute_method="block",
                                        recompute_num_layers=18), 1)
    assert sp.activations < tp.activations < base.activations
    assert full.activations < block.activations < base.activations
    assert tp.weights == pytest.approx(base.weights / 2, rel=0.01)


def test_pipeline_first_stage_holds_pp_microbatches():
    m = get_preset("8B")
    pp2 = estimate_memory(m, plan_cfg(gbs=8, pipeline_model_parallel_size=2), 2)
    one = estimate_memory(m, plan_cfg(), 1)
    # stage 0: half the layers, two micro-batches in flight
    assert pp2.activations == pytest.approx(one.activations, rel=0.01)


def test_fits_and_suggest():
    m = get_preset("32B")
    assert not estimate_memory(m, plan_cfg(), 1).fits(80)
    layouts = suggest_layouts(m, plan_cfg(gbs=64), 16, 64)
    assert layouts and all(est.fits(64) for _, est in layouts)
    assert all(layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"] == 16 for layout, _ in layouts)


def test_cli(capsys):
    argv = ["--model-preset", "1.7B", "--seq-length", "4096", "--micro-batch-size", "1", "--bf16"]
    assert main(argv + ["--device-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80 GB" in out and "activations" in out
    assert main(argv + ["--device-memory-gb", "8"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    from qtrain import cli

    assert cli.main(["plan"] + argv + ["--tensor-model-parallel-size", "3"]) == 1
    assert "--num-attention-heads" in capsys.readouterr().err
    assert main(["--model-preset", "8B", "--seq-length", "4096", "--global-batch-size", "16", "--bf16",
                 "--suggest", "8", "--device-memory-gb", "80"]) == 0
    assert "tp=" in capsys.readouterr().out
    assert main(argv + ["--global-batch-size", "32", "--pipeline-model-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "busiest stage 0 of 2" in out and "last stage (1, computes the loss)" in out and "no logits" in out


@pytest.mark.parametrize("algo", ["megatron_cp_algo", "ulysses_cp_algo", "hybrid_cp_algo"])
def test_context_parallel_activations_fall_as_one_over_cp(algo):
    """Per-rank activations of a 1.7B layer at 32K: CP ranks split the tokens and keep nothing of the
    whole sequence, so activations halve with each doubling of CP (for every algorithm); the ring
    adds its float32 output and LSE per token, Ulysses its re-laid q/k/v/output, hybrid both."""
    from qtrain.parallel.ring_attention import SCORE_CHUNK_BYTES

    m = get_preset("1.7B")

    def estimate(cp):
        c = PretrainConfig()
        c.data.seq_length, c.training.bf16 = 32768, True
        c.parallel.context_parallel_size, c.parallel.context_parallel_algo = cp, algo
        c.parallel.use_distributed_optimizer = True
        if algo == "hybrid_cp_algo":
            c.parallel.ulysses_degree_in_cp = 2
        return estimate_memory(m, c, cp, device_type="cpu")

    acts = {cp: estimate(cp).activations for cp in (2, 4, 8)}
    assert acts[2] == pytest.approx(2 * acts[4]) and acts[4] == pytest.approx(2 * acts[8])
    q, k, n = 16 * 128, 8 * 128, 16
    extra = {"megatron_cp_algo": 4 * q + 4 * n, "ulysses_cp_algo": 2 * (2 * q + 2 * k)}
    extra["hybrid_cp_algo"] = extra["megatron_cp_algo"] + extra["ulysses_cp_algo"]
    per_token = layer_activation_bytes(m, 2, cp=4, cp_algo=algo) - layer_activation_bytes(m, 2)
    assert per_token == extra[algo]
    ring_buffers = estimate(4).transient - estimate_memory(
        m, PretrainConfig(), 1, seq_length=32768 // 4, bf16=True, device_type="cpu").transient
    assert ring_buffers == pytest.approx(0 if algo == "ulysses_cp_algo" else 4 * SCORE_CHUNK_BYTES, rel=1e-6)
