"""qtrain plan for Qwen3-MoE: parameter counts against transformers' Qwen3MoeForCausalLM, experts
sharded by EP / FSDP, the MoE activation and all-to-all terms, EP in suggestions for 30B-A3B and
235B-A22B. Model shapes come from transformers' Qwen3MoeConfig (the published config.json values)."""

from __future__ import annotations

import pytest

from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.parallel import moe_plan
from qtrain.parallel.plan import estimate_memory, layer_activation_bytes, suggest_layouts

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            mlp_only_layers=[0], tie_word_embeddings=False)
# config.json of Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (shape fields)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, tie_word_embeddings=False, norm_topk_prob=True)
QWEN3_235B_A22B = dict(QWEN3_30B_A3B, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                       num_hidden_layers=94, num_attention_heads=64)


def cfg(*flags: str):
    return parse_args(["--seq-length", "64", "--train-iters", "1", *flags])


def test_parameters_equal_transformers_qwen3_moe():
    """At TP1 PP1 EP1 the plan's parameters are those of transformers' model; over PP2 the stages add up."""
    m = transformers.Qwen3MoeConfig(**TINY)
    want = sum(p.numel() for p in transformers.Qwen3MoeForCausalLM(m).parameters())
    assert estimate_memory(m, cfg(), 1, device_type="cpu").params == want
    two = cfg("--pipeline-model-parallel-size", "2", "--global-batch-size", "2")
    assert sum(estimate_memory(m, two, 2, stage=s, device_type="cpu").params for s in (0, 1)) == want


def test_expert_parameters_per_rank_fall_by_ep():
    m = transformers.Qwen3MoeConfig(**TINY)
    experts = 3 * moe_plan.expert_params(m)  # three MoE layers
    plain = {ep: estimate_memory(m, cfg("--expert-model-parallel-size", str(ep)), 4, device_type="cpu")
             for ep in (1, 2, 4)}
    for ep in (2, 4):  # no FSDP: each rank keeps E / EP experts in full
        assert plain[1].params - plain[ep].params == experts - experts / ep
        assert plain[1].weights - plain[ep].weights == 4 * (experts - experts / ep)
    m = transformers.Qwen3MoeConfig(**{**TINY, "intermediate_size": 8})  # a MoE layer is the largest one gathered
    sharded = {ep: estimate_memory(m, cfg("--use-distributed-optimizer", "--expert-model-parallel-size", str(ep)), 4,
                                   device_type="cpu") for ep in (1, 4)}
    # FSDP over the 4 ranks shards experts 4 ways either way; EP shrinks what one layer gathers
    assert sharded[1].weights == sharded[4].weights == 4 * (sharded[1].params / 4)
    gathered = 2 * 4 * (moe_plan.expert_params(m) - moe_plan.expert_params(m) / 4)  # two layers, fp32
    a2a = moe_plan.a2a_buffer_bytes(m, 64, 4, 4)
    assert sharded[1].transient - sharded[4].transient == pytest.approx(gathered - a2a)
    assert a2a == 2 * 2 * 64 * 4 * 32  # send + receive, top-2 copies of 64 tokens of 32 fp32 values


def test_moe_layer_activations_replace_the_dense_mlp():
    m = transformers.Qwen3MoeConfig(**TINY)
    b, k, h, i, e = 2, 2, 32, 16, 4
    dense, moe = layer_activation_bytes(m, b, layer=0), layer_activation_bytes(m, b, layer=1)
    assert moe - dense == (8 * e + 12 * k + 2 * k * b * h + 4 * k * b * i) - 4 * b * 48
    assert layer_activation_bytes(m, b, layer=1, mode="full") == layer_activation_bytes(m, b, layer=0, mode="full")
    sel = layer_activation_bytes(m, b, layer=1, mode="selective") - layer_activation_bytes(m, b, layer=0,
                                                                                             mode="selective")
    assert sel == (8 * e + 12 * k + 2 * k * b * h + 2 * k * b * i) - 2 * b * 48
    # under sequence parallelism each TP rank routes its share of the tokens
    assert moe_plan.mlp_activation_bytes(m, b, tp=2, sp=True) == moe_plan.mlp_activation_bytes(m, b) / 2


def test_ep_must_divide_experts_and_data_parallel_ranks():
    m = transformers.Qwen3MoeConfig(**TINY)
    with pytest.raises(ConfigError, match="does not divide the model's 4 experts"):
        estimate_memory(m, cfg("--expert-model-parallel-size", "8"), 8, device_type="cpu")
    with pytest.raises(ConfigError, match=r"must divide data-parallel x context-parallel ranks \(1 x 1\)"):
        estimate_memory(m, cfg("--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"), 2,
                        device_type="cpu")


@pytest.mark.parametrize("devices,memory", [(8, 80), (16, 64), (16, 80)])
def test_30b_a3b_layouts_fit_with_ep(devices, memory):
    m = transformers.Qwen3MoeConfig(**QWEN3_30B_A3B)
    job = parse_args(["--seq-length", "4096", "--bf16", "--global-batch-size", "256", "--train-iters", "1"])
    found = suggest_layouts(m, job, devices, memory, device_type="cuda")
    assert found and all(est.fits(memory) for _, est in found)
    assert any(layout.get("ep", 1) > 1 for layout, _ in found)
    # one stage, FSDP: 12 bytes per parameter of the whole model (fp32 weights, AdamW) spread over the
    # devices, experts included whatever EP; the fp32 gradients accumulate unsharded over the GBS 256's
    # micro-batches (4 bytes per parameter the rank holds: the dense part and its EP share of the experts)
    total = estimate_memory(m, parse_args(["--seq-length", "4096", "--train-iters", "1"]), 1, device_type="cuda").params
    for layout, est in found:
        if layout["pp"] == layout["tp"] == 1 and layout["distributed_optimizer"]:
            assert est.weights + est.optimizer == pytest.approx(12 * total / devices)
            assert est.grads == pytest.approx(4 * est.params)


def test_235b_a22b_needs_more_than_16_devices(capsys):
    from qtrain.parallel.plan import main

    m = transformers.Qwen3MoeConfig(**QWEN3_235B_A22B)
    job = parse_args(["--seq-length", "4096", "--bf16", "--global-batch-size", "256", "--train-iters", "1"])
    # without host memory no layout fits: whatever is suggested keeps the optimizer state there ...
    for devices, memory in ((8, 64), (8, 80), (16, 64), (16, 80)):
        assert all(layout.get("optimizer_cpu_offload") for layout, _ in suggest_layouts(
            m, job, devices, memory, device_type="cuda"))
    # ... and what `qtrain plan` then suggests keeps the optimizer state in host memory, saying how much
    # (EP with the offload is refused, in the plan as in training)
    main(["--model-preset", "235B-A22B", "--seq-length", "4096", "--bf16", "--suggest", "16",
          "--device-memory-gb", "80"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("  tp=")]
    assert lines and all("optimizer_cpu_offload=True" in ln and "host" in ln and "ep=" in ln for ln in lines)
    assert all(" ep=1 " in ln for ln in lines)
