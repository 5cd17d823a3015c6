"""LoRA on the LM head (`--lora-target-modules lm_head`): the chunked training loss, which multiplies the
head weight itself, sees the adapter (W + B A alpha/r folded in), with the loss and the adapter's
gradients of the plain logits path; a tied head and head dropout are refused by name."""

import pytest
import torch

from qtrain.checkpoint.adapter import LoRAConfig, parse_target_modules
from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.ops.cross_entropy import cross_entropy
from qtrain.train.lora import LoRALinear, adapters_disabled, inject_lora
from tolerances import assert_close_scaled, qwen3_terms

CFG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rope_theta=10000.0)


def _lora_model(tied=False, dropout=0.0):
    cfg = Qwen3Config(**CFG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(std=0.2)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=["lm_head", "q_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return model


def test_lm_head_is_a_target_by_name_only():
    assert parse_target_modules(["lm_head", "linear_qkv"]) == ["q_proj", "k_proj", "v_proj", "lm_head"]
    assert parse_target_modules("output_layer") == ["lm_head"]  # Megatron's name
    assert "lm_head" not in parse_target_modules("all-linear")  # as peft's all-linear


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_loss_sees_the_head_adapter(reduction):
    model = _lora_model()
    assert isinstance(model.lm_head, LoRALinear)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    # the plain path: logits through LoRALinear.forward, then cross-entropy
    want = cross_entropy(model(ids), labels, reduction="mean" if reduction == "mean" else "none")
    want = want if reduction == "mean" else want.view(2, 11)
    weight = torch.randn(2, 11) if reduction == "none" else None
    (want if weight is None else (want * weight).sum()).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got = model(ids, labels=labels, loss_reduction=reduction)
    (got if weight is None else (got * weight).sum()).backward()
    terms = qwen3_terms(model.config, 11, tokens=22, backward=True)
    assert_close_scaled(got.detach(), want.detach(), terms=terms, what="loss")
    for name, grad in want_grads.items():
        assert_close_scaled(dict(model.named_parameters())[name].grad, grad, terms=terms, what=name)
    assert want_grads["lm_head.lora_A.weight"].abs().max() > 0 and want_grads["lm_head.lora_B.weight"].abs().max() > 0
    with torch.no_grad(), adapters_disabled(model):  # the base head alone: another loss, so the adapter mattered
        base = model(ids, labels=labels, loss_reduction=reduction)
    assert (base - got.detach()).abs().max() > 1e-3


def test_tied_head_and_head_dropout_are_refused():
    with pytest.raises(ConfigError, match="ties the LM head"):
        _lora_model(tied=True)
    with pytest.raises(ConfigError, match="needs --lora-dropout 0"):
        _lora_model(dropout=0.1)


def test_head_adapter_loads_in_peft_and_merges(tmp_path):
    """The head adapter is written under peft's names: peft applies it to its own model with the same
    logits, and the merged export (W + B A alpha/r) computes what the adapted model computes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from qtrain.checkpoint.adapter import merge_lora_state_dict
    from qtrain.train.lora import save_adapter

    model = _lora_model()
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**model.config.to_hf_dict("float32"))).eval()
    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    hf.load_state_dict(base)
    save_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=["lm_head", "q_proj"]), tmp_path / "adapter")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        got = model.eval()(ids)
        merged = Qwen3ForCausalLM(model.config)
        merged.load_state_dict(merge_lora_state_dict(model.state_dict(), 2.0))
        again = merged.eval()(ids)
    terms = qwen3_terms(model.config, 11) + (4,)
    assert_close_scaled(got, ref, terms=terms, what="logits vs peft")
    assert_close_scaled(again, got, terms=terms, what="merged logits")
