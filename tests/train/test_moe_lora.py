"""LoRA on Qwen3-MoE: per-expert low-rank pairs on the stacked experts plus attention adapters,
exported as peft adapters under the per-expert names of released checkpoints, loaded by peft on
transformers' Qwen3MoeForCausalLM with the same logits; merging gives the same model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from qtrain.checkpoint.adapter import LoRAConfig, merge_lora_state_dict, write_adapter
from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.train.lora import adapter_state_dict, inject_lora, merge_into_model
from tolerances import assert_close_scaled, qwen3_terms

CFG = dict(model_type="qwen3_moe", vocab_size=89, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=12, norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False)


def _models(mixed=True):
    d = {**CFG, "mlp_only_layers": [0] if mixed else []}
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **{k: v for k, v in d.items() if k != "model_type"})).eval()
    ours = Qwen3ForCausalLM(Qwen3Config.from_hf_dict(d)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


# mixed: a dense first layer (mlp_only_layers). peft 0.21 on transformers 5 maps every gate/up/down
# target of a qwen3_moe model to the fused expert parameters, so it drops the dense layer's MLP
# adapters: compared with peft only when every layer is sparse (the released models).
@pytest.mark.parametrize("mixed", [False, True], ids=["all-sparse", "mixed"])
def test_expert_lora_exports_to_peft_and_merges(tmp_path, mixed):
    hf, ours = _models(mixed)
    lora = LoRAConfig(r=2, alpha=6.0)  # every projection: attention, the dense layer's MLP, the experts
    wrapped = inject_lora(ours, lora)
    assert "model.layers.1.mlp.experts" in wrapped and ("model.layers.0.mlp.gate_proj" in wrapped) == mixed
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert "model.layers.1.mlp.experts.gate_up_proj_lora.lora_A" in trainable
    assert all("lora" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    ids = torch.randint(0, 89, (2, 13))
    loss = ours(ids, labels=ids)
    loss.backward()
    assert ours.model.layers["1"].mlp.experts.down_proj_lora.lora_A.grad.abs().sum() > 0
    assert ours.model.layers["1"].mlp.experts.down_proj.grad is None
    with torch.no_grad():
        logits = ours(ids)
    tensors = adapter_state_dict(ours)
    write_adapter(tensors, lora, tmp_path / "adapter")
    assert "base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight" in tensors
    if not mixed:
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        with torch.no_grad():
            assert_close_scaled(logits, peft_model(input_ids=ids).logits, terms=qwen3_terms(ours.config, 13))
    merged_sd = merge_lora_state_dict(ours.state_dict(), lora.scaling)
    plain = Qwen3ForCausalLM(ours.config).eval()
    plain.load_state_dict(merged_sd)
    merge_into_model(ours)
    with torch.no_grad():
        assert_close_scaled(ours(ids), logits, terms=qwen3_terms(ours.config, 13))
        assert_close_scaled(plain(ids), logits, terms=qwen3_terms(ours.config, 13))
    # qtrain's own --lora-load merge of the per-expert adapter (generate / evaluate / convert)
    from qtrain.checkpoint.adapter import apply_adapter

    _, again = _models(mixed)
    apply_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert_close_scaled(again(ids), logits, terms=qwen3_terms(ours.config, 13))


def test_a_subset_of_expert_projections_is_refused():
    _, ours = _models()
    with pytest.raises(ConfigError, match="gate_proj, up_proj and down_proj together"):
        inject_lora(ours, LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))


def test_lora_sft_on_moe_trains_adapters_and_exports_the_merge(tmp_path):
    """`qtrain sft --lora-r` on an HF Qwen3-MoE dir: base frozen, per-expert adapter written with
    the checkpoint, --save-hf the base with the adapter merged."""
    from qtrain.checkpoint.adapter import merge_lora
    from qtrain.models.hf import iter_safetensors
    from qtrain.train.sft import run_sft
    from test_sft import SEQ, VOCAB, _samples, write_instruction_data

    torch.manual_seed(1)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "base")
    data = write_instruction_data(tmp_path / "alpaca", _samples(4, seed=6))
    result = run_sft(["--data-path", data, "--seq-length", str(SEQ), "--micro-batch-size", "2",
                      "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-2", "--lr-decay-style", "constant",
                      "--log-interval", "1", "--eval-iters", "0", "--split", "100,0,0", "--save", str(tmp_path / "ckpt"),
                      "--load", str(tmp_path / "base"), "--finetune", "--lora-r", "4", "--lora-alpha", "8",
                      "--moe-aux-loss-coeff", "0.01", "--save-hf", str(tmp_path / "merged")], log=lambda *a: None)
    assert len(result.losses) == 4
    adapter = tmp_path / "ckpt" / "iter_0000004" / "adapter"
    base = dict(iter_safetensors(tmp_path / "base"))
    merged = merge_lora(base, adapter)
    exported = dict(iter_safetensors(tmp_path / "merged"))
    assert exported.keys() == base.keys()
    moved = [n for n in base if not torch.equal(exported[n], base[n])]
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in moved and "model.layers.0.self_attn.q_proj.weight" in moved
    for name, t in exported.items():
        assert_close_scaled(t.float(), merged[name].float(), terms=(4,), what=name)
