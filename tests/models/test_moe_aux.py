"""Megatron-core's per-layer load-balancing loss (qtrain.models.moe_aux) equals megatron-core's
switch_load_balancing_loss_func, value and gradient, and attached inside the experts blocks its
gradient is that of (main loss + coeff * sum of the layers' losses), micro-batches averaged."""

import pytest
import torch

from qtrain.models.config import Qwen3Config
from qtrain.models.moe_aux import switch_load_balancing_loss
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.train.moe import MEGATRON, MoeTraining
from tolerances import assert_close_scaled

moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")


@pytest.mark.parametrize("tokens,experts,top_k", [(37, 8, 2), (64, 16, 4), (5, 4, 1)])
def test_loss_and_gradient_equal_megatron_core(tokens, experts, top_k):
    torch.manual_seed(tokens)
    coeff = 0.01
    logits = torch.randn(tokens, experts, dtype=torch.float32, requires_grad=True)
    # Megatron's router for Qwen3 (score function softmax): full fp32 softmax scores feed the loss,
    # the routing map is their top-k (compute_routing_scores_for_aux_loss)
    routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, top_k, "softmax")
    want = moe_utils.switch_load_balancing_loss_func(scores, routing_map.sum(0), tokens, top_k, experts, coeff)
    (want_grad,) = torch.autograd.grad(want, logits)

    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # what qtrain.ops.moe.route returns
    counts = torch.bincount(torch.topk(probs, top_k, dim=-1).indices.reshape(-1), minlength=experts)
    got = coeff * switch_load_balancing_loss(probs, counts, top_k)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert torch.equal(counts, routing_map.sum(0))
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-6 * abs(float(want.detach()))
    assert_close_scaled(got_grad, want_grad, terms=(tokens, experts), what="gradient")


CFG = dict(model_type="qwen3_moe", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
           tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           norm_topk_prob=True, mlp_only_layers=[0])


def test_attached_gradient_is_gradient_of_main_plus_aux():
    """Two micro-batches as the loop runs them (each loss / 2, backward): the gradients with the
    blocks' attached loss equal autograd of mean over micro-batches of (main + coeff * sum_l loss_l),
    computed explicitly from the routing statistics; the logged value is that sum, averaged."""
    torch.manual_seed(0)
    cfg = Qwen3Config.from_hf_dict(CFG)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights()
    batches = [torch.randint(0, cfg.vocab_size, (2, 12)) for _ in range(2)]
    coeff, n = 0.3, len(batches)

    explicit, aux_values = [], []
    for ids in batches:
        main = model(ids, labels=ids, loss_reduction="sum") / ids.numel()
        stats = model.router_stats()
        aux = sum(cfg.num_experts / (cfg.num_experts_per_tok * s.num_tokens ** 2) * torch.sum(s.prob_sum * s.counts)
                  for s in stats)
        aux_values.append(float(aux.detach()))
        ((main + coeff * aux) / n).backward()
    explicit = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    moe = MoeTraining(coeff, cfg.num_experts, MEGATRON)
    moe.begin_step(model, n, pipeline=False)
    for ids in batches:
        main = model(ids, labels=ids, loss_reduction="sum") / ids.numel()
        assert moe.extra_loss(model) is None  # attached inside the blocks
        (main / n).backward()
    for k, p in model.named_parameters():
        assert_close_scaled(p.grad, explicit[k], terms=(200,), what=k)
    router = model.model.layers["1"].mlp.gate.weight.grad
    assert router.abs().max() > 0
    metrics = moe.take_metrics()
    assert abs(metrics["load_balancing_loss"] - sum(aux_values) / n) <= 1e-6 * metrics["load_balancing_loss"]
    assert len(metrics["expert_load_max_over_mean"]) == 2  # layers 1 and 2


def test_attached_loss_changes_the_router_gradient():
    """Guard against a vacuous comparison: the attached loss moves the router's gradient."""
    torch.manual_seed(1)
    cfg = Qwen3Config.from_hf_dict(CFG)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    grads = []
    for coeff in (0.0, 0.3):
        for layer in model.model.layers.values():
            layer.mlp.aux_loss = None  # a new MoeTraining attaches its own
        moe = MoeTraining(coeff, cfg.num_experts, MEGATRON)
        moe.begin_step(model, 1, pipeline=False)
        model(ids, labels=ids, loss_reduction="sum").backward()
        grads.append(model.model.layers["1"].mlp.gate.weight.grad.clone())
        model.zero_grad(set_to_none=True)
    assert (grads[0] - grads[1]).abs().max() > 1e-4 * grads[0].abs().max()
