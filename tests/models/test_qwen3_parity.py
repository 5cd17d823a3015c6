"""The qtrain model computes what transformers' Qwen3ForCausalLM computes, on several shapes."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM, build_model
from qtrain.parallel.weights import materialize
from qtrain.ops.cross_entropy import cross_entropy
from tolerances import assert_close_scaled, qwen3_terms

# (hidden, intermediate, layers, heads, kv heads, head_dim, tied): GQA ratios 1, 2, 4, head_dim
# unrelated to hidden/heads, odd sizes.
SHAPES = [
    (64, 160, 2, 4, 4, 16, True),
    (96, 200, 3, 4, 2, 32, False),
    (72, 131, 2, 8, 2, 24, True),
    (80, 96, 2, 4, 1, 40, False),
]


def _pair(shape, vocab=211, seed=0):
    h, i, n, a, kv, d, tied = shape
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=a, num_key_value_heads=kv, head_dim=d, tie_word_embeddings=tied,
                      max_position_embeddings=256, rope_theta=10000.0 + 37 * seed)
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf_dict("float32"),
                                                                attn_implementation="sdpa")).eval()
    # Norm weights are 1 at init; randomise them so the test sees the weight multiply.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    ours = Qwen3ForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return cfg, hf, ours


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}-kv{s[3]//s[4]}-d{s[5]}-{'tied' if s[6] else 'untied'}")
def test_logits_and_loss_match_transformers_fp32(shape):
    cfg, hf, ours = _pair(shape, seed=SHAPES.index(shape))
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        out = hf(input_ids=ids, labels=ids)
        logits = ours(ids)
    assert logits.shape == (2, 37, cfg.vocab_size)
    assert_close_scaled(logits, out.logits, terms=qwen3_terms(cfg, 37), what="logits")
    loss = cross_entropy(logits[:, :-1], ids[:, 1:])
    assert_close_scaled(loss, out.loss, terms=qwen3_terms(cfg, 37, tokens=72), what="loss")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["mha-tied", "gqa2-untied"])
def test_logits_match_transformers_bf16(shape):
    cfg, hf, ours = _pair(shape, seed=5)
    inv_freq = hf.model.rotary_emb.inv_freq.clone()
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    # `.to(bf16)` also rounds HF's RoPE frequency buffer, which from_pretrained(dtype=bf16) keeps
    # in float32; restore it so both models compute the RoPE angles as a bf16 checkpoint load does.
    hf.model.rotary_emb.inv_freq = inv_freq
    ids = torch.randint(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, ours(ids)
    # Both run the same bf16 operations; allow a few bf16 ulps of the largest logit.
    assert_close_scaled(got, ref, rel=2 * 2**-8, what="bf16 logits")


def test_position_ids_and_mask_paths_agree_with_default():
    cfg, _, ours = _pair(SHAPES[1], seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    pos = torch.arange(16).unsqueeze(0)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        base = ours(ids)
        assert torch.allclose(ours(ids, position_ids=pos), base, atol=0, rtol=0)
        assert_close_scaled(ours(ids, attention_mask=causal), base, terms=qwen3_terms(cfg, 16), what="masked")


def test_1p7b_preset_builds_on_meta_with_exact_parameter_count():
    from qtrain.models.presets import get_preset

    cfg = get_preset("1.7B")
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_720_574_976 == cfg.num_params
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_materialize_allocates_once_and_keeps_tie():
    from qtrain.models.presets import get_preset

    cfg = get_preset("tiny")
    model = materialize(build_model(cfg), "cpu", seed=0)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters()))  # one allocation per parameter, none shared twice
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std = model.model.layers["0"].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    again = materialize(build_model(cfg), "cpu", seed=0)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_materialize_1p7b_peak_memory_is_one_model(tmp_path):
    """Materialising the 1.7B preset in bf16 allocates the weights once (3.4 GB), not twice."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from qtrain.models.presets import get_preset\n"
        "from qtrain.models.qwen3 import build_model\n"
        "from qtrain.parallel.weights import materialize\n"
        "m = materialize(build_model(get_preset('1.7B')), 'cpu', dtype=torch.bfloat16, std=0.02)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    weights = 1_720_574_976 * 2
    assert weights < peak < 1.5 * weights, peak  # one copy plus the interpreter and torch


def test_forward_with_labels_equals_transformers_loss_and_grads():
    cfg, hf, ours = _pair(SHAPES[1], seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = hf(input_ids=ids, labels=ids)
    out.loss.backward()
    loss = ours(ids, labels=labels)
    loss.backward()
    assert_close_scaled(loss, out.loss, terms=qwen3_terms(cfg, 19, tokens=36), what="loss")
    ref = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_scaled(p.grad, ref[name].grad, terms=qwen3_terms(cfg, 19, tokens=36, backward=True), what=name)
