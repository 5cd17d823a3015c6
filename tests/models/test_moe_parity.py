"""qtrain's Qwen3-MoE computes what transformers' Qwen3MoeForCausalLM computes (fp32): logits, the
loss with the load-balancing loss, and gradients, over top-k, renormalisation and mixes of dense
and sparse layers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from tolerances import assert_close_scaled, qwen3_terms

BASE = dict(model_type="qwen3_moe", vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            rope_theta=10000.0, tie_word_embeddings=False, num_experts=8, moe_intermediate_size=24,
            output_router_logits=True, router_aux_loss_coef=0.02)

CASES = {
    "top1": dict(num_experts_per_tok=1, norm_topk_prob=False),
    "top2-norm": dict(num_experts_per_tok=2, norm_topk_prob=True),
    "top4": dict(num_experts_per_tok=4, norm_topk_prob=False),
    "top4-norm-step2": dict(num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=2),
    "top2-mlp-only": dict(num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0, 2]),
}


def _pair(case, seed=0):
    d = {**BASE, **CASES[case]}
    torch.manual_seed(seed)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **{k: v for k, v in d.items() if k != "model_type"}, attn_implementation="sdpa")).eval()
    with torch.no_grad():  # norms are 1 at init: randomise them so the test sees the multiply
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    ours = Qwen3ForCausalLM(Qwen3Config.from_hf_dict(d)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.config, hf, ours


def _terms(cfg, seq, tokens=0, backward=False):
    return qwen3_terms(cfg, seq, tokens, backward) + (cfg.num_experts, cfg.moe_intermediate_size) * cfg.num_hidden_layers


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_loss_aux_and_grads_match_transformers_fp32(case):
    cfg, hf, ours = _pair(case, seed=sorted(CASES).index(case))
    assert [i for i in range(4) if type(ours.model.layers[str(i)].mlp).__name__ == "Qwen3MoeSparseMoeBlock"] == \
        [i for i, layer in enumerate(hf.model.layers) if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"]
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(7))
    out = hf(input_ids=ids, labels=ids)
    with torch.no_grad():
        logits = ours(ids)
    assert_close_scaled(logits, out.logits, terms=_terms(cfg, 23), what="logits")
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    ce = ours(ids, labels=labels)
    aux = ours.moe_aux_loss()
    assert_close_scaled(aux, out.aux_loss, terms=_terms(cfg, 23), what="aux loss")
    loss = ce + cfg.router_aux_loss_coef * aux
    assert_close_scaled(loss, out.loss, terms=_terms(cfg, 23, tokens=44), what="loss")
    out.loss.backward()
    loss.backward()
    ref = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_scaled(p.grad, ref[name].grad, terms=_terms(cfg, 23, tokens=44, backward=True), what=name)


def test_expert_layout_and_stats():
    cfg, hf, ours = _pair("top2-norm")
    experts = ours.model.layers["1"].mlp.experts
    assert experts.gate_up_proj.shape == (8, 48, 48) and experts.down_proj.shape == (8, 48, 24)
    assert ours.model.layers["1"].mlp.gate.weight.shape == (8, 48)
    with torch.no_grad():
        ours(torch.randint(0, cfg.vocab_size, (3, 5)))
    stats = ours.router_stats()
    assert len(stats) == 4 and all(int(s.counts.sum()) == 15 * 2 and s.num_tokens == 15 for s in stats)
    assert all(torch.allclose(s.prob_sum.sum(), torch.tensor(15.0)) for s in stats)
