"""LoRA: frozen base, PEFT-format adapter that peft loads with identical logits, merge == base + delta."""

import json

import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.checkpoint.adapter import (LoRAConfig, apply_adapter, load_adapter, merge_lora, merge_lora_state_dict,
                                      parse_target_modules)
from qtrain.train.lora import LoRALinear, inject_lora, merge_into_model, save_adapter
from tolerances import assert_close_scaled, qwen3_terms

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rope_theta=10000.0)


def _models(tied=True):
    cfg = Qwen3Config(**CFG, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf_dict("float32"))).eval()
    ours = Qwen3ForCausalLM(cfg)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _randomise_adapters(model):
    # B starts at zero (the adapter is a no-op); give both factors values so the test sees them.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_target_module_names_hf_and_megatron():
    assert parse_target_modules("linear_qkv,linear_fc2") == ["q_proj", "k_proj", "v_proj", "down_proj"]
    assert parse_target_modules(["o_proj", "linear_proj", "linear_fc1"]) == ["o_proj", "gate_proj", "up_proj"]
    with pytest.raises(ConfigError, match="unknown module 'qkv'"):
        parse_target_modules("qkv")


def test_inject_freezes_base_and_keeps_names():
    _, ours = _models()
    names_before = set(ours.state_dict())
    wrapped = inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["linear_qkv", "linear_fc2"]))
    assert len(wrapped) == 2 * 4
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert names_before <= set(ours.state_dict())  # base weights keep their HF names
    ids = torch.randint(0, 97, (2, 9))
    ours(ids).sum().backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads == trainable


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_adapter_loads_in_peft_with_same_logits(tmp_path, tied):
    hf, ours = _models(tied)
    lcfg = LoRAConfig(r=4, alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    inject_lora(ours, lcfg)
    _randomise_adapters(ours)
    save_adapter(ours, lcfg, tmp_path / "adapter")
    keys = set(load_adapter(tmp_path / "adapter")[1])
    assert "model.layers.1.self_attn.q_proj" in keys
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12

    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        got = ours.eval()(ids)
    assert_close_scaled(got, ref, terms=qwen3_terms(ours.config, 11) + (4,), what="logits")
    # The adapter changes the output: the comparison is not base vs base.
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    assert (plain - ref).abs().max() > 1e-3


def test_merged_export_equals_base_plus_delta(tmp_path):
    _, ours = _models()
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    lcfg = LoRAConfig(r=3, alpha=6, target_modules=["all-linear"])
    inject_lora(ours, lcfg)
    _randomise_adapters(ours)
    save_adapter(ours, lcfg, tmp_path / "adapter")
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        want_logits = ours.eval()(ids)

    merged = merge_lora(base, tmp_path / "adapter")
    a = ours.model.layers["1"].mlp.up_proj
    expected = base["model.layers.1.mlp.up_proj.weight"] + (a.lora_B.weight @ a.lora_A.weight) * 2.0
    assert_close_scaled(merged["model.layers.1.mlp.up_proj.weight"], expected, terms=(3,))
    assert merged["model.norm.weight"] is base["model.norm.weight"]  # untouched tensors pass through

    in_memory = merge_lora_state_dict(dict(ours.state_dict()), lcfg.scaling)
    assert set(in_memory) == set(base)
    for k in base:
        assert_close_scaled(in_memory[k], merged[k], terms=(3,), what=k)

    plain = Qwen3ForCausalLM(Qwen3Config(**CFG))
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert_close_scaled(plain.eval()(ids), want_logits, terms=qwen3_terms(plain.config, 8) + (3,))
    merge_into_model(ours)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    assert set(ours.state_dict()) == set(base)
    with torch.no_grad():
        assert_close_scaled(ours(ids), want_logits, terms=qwen3_terms(plain.config, 8) + (3,))


def test_apply_adapter_to_loaded_model(tmp_path):
    _, ours = _models()
    target = Qwen3ForCausalLM(Qwen3Config(**CFG))
    target.load_state_dict(ours.state_dict())
    lcfg = LoRAConfig(r=2, alpha=2, target_modules=["k_proj"])
    inject_lora(ours, lcfg)
    _randomise_adapters(ours)
    save_adapter(ours, lcfg, tmp_path / "a")
    apply_adapter(target, tmp_path / "a")
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert_close_scaled(target.eval()(ids), ours.eval()(ids), terms=qwen3_terms(ours.config, 6) + (2,))


def test_adapter_for_another_model_is_rejected(tmp_path):
    _, ours = _models()
    lcfg = LoRAConfig(r=2, alpha=2, target_modules=["q_proj"])
    inject_lora(ours, lcfg)
    save_adapter(ours, lcfg, tmp_path / "a")
    other = dict(Qwen3ForCausalLM(Qwen3Config(**{**CFG, "num_hidden_layers": 1})).state_dict())
    with pytest.raises(Exception, match="model.layers.1.self_attn.q_proj"):
        merge_lora(other, tmp_path / "a")
    with pytest.raises(Exception, match="adapter_config.json"):
        merge_lora(other, tmp_path)


def test_merged_source_streams_merged_tensors(tmp_path):
    from qtrain.checkpoint.sources import HFSource
    from qtrain.models.hf import save_hf
    from qtrain.checkpoint.adapter import LoRAMergedSource

    _, ours = _models()
    save_hf(ours, tmp_path / "base")
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    lcfg = LoRAConfig(r=2, alpha=4, target_modules=["o_proj", "down_proj"])
    inject_lora(ours, lcfg)
    _randomise_adapters(ours)
    save_adapter(ours, lcfg, tmp_path / "a")
    src = LoRAMergedSource(HFSource(tmp_path / "base"), tmp_path / "a")
    want = merge_lora(base, tmp_path / "a")
    assert src.config.num_hidden_layers == 2
    for name in src.names():
        assert torch.equal(src.get(name), want[name]), name
    assert not torch.equal(src.get("model.layers.0.self_attn.o_proj.weight"),
                           base["model.layers.0.self_attn.o_proj.weight"])


def test_convert_lora_load_exports_the_merged_model(tmp_path):
    from qtrain.checkpoint.convert import main as convert
    from qtrain.models.hf import iter_safetensors, save_hf

    _, ours = _models(tied=False)
    save_hf(ours, tmp_path / "base")
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    lcfg = LoRAConfig(r=2, alpha=4, target_modules=["linear_qkv", "linear_fc2"])
    inject_lora(ours, lcfg)
    _randomise_adapters(ours)
    save_adapter(ours, lcfg, tmp_path / "a")
    assert convert(["--load-model-type", "hf", "--save-model-type", "hf", "--load-dir", str(tmp_path / "base"),
                    "--save-dir", str(tmp_path / "out"), "--lora-load", str(tmp_path / "a")]) == 0
    got = dict(iter_safetensors(tmp_path / "out"))
    want = merge_lora(base, tmp_path / "a")
    assert set(got) == set(want)
    for k in got:
        assert torch.equal(got[k], want[k]), k
