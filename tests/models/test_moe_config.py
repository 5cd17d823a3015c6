"""Qwen3-MoE config keys: implemented with transformers' names and defaults, the sparse-layer rule
and the parameter counts as transformers' Qwen3MoeForCausalLM has them, presets from the
released config.json files."""

import dataclasses

import pytest

transformers = pytest.importorskip("transformers")

from qtrain.errors import ConfigError
from qtrain.models import hf_config_keys as keys
from qtrain.models.config import Qwen3Config
from qtrain.models.presets import get_preset

# Qwen/Qwen3-30B-A3B's published config.json (written by transformers 4.51.0).
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

TINY_MOE = dict(model_type="qwen3_moe", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                rope_theta=10000.0, tie_word_embeddings=False, num_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=16)


def _categories(key):
    return [name for name, table in (("implemented", keys.IMPLEMENTED), ("moe", keys.MOE_IMPLEMENTED),
                                     ("no effect", keys.NO_EFFECT), ("required value", keys.REQUIRED),
                                     ("refused", keys.REFUSED)) if key in table]


def test_every_transformers_qwen3_moe_key_is_classified_once():
    fields = {f.name for f in dataclasses.fields(transformers.Qwen3MoeConfig)}
    written = set(transformers.Qwen3MoeConfig().to_dict())
    for key in sorted(fields | written | set(QWEN3_30B_A3B_CONFIG)):
        assert len(_categories(key)) == 1, (key, _categories(key))
    moe_only = keys.MOE_IMPLEMENTED - {"num_local_experts"}
    assert moe_only <= fields and not moe_only & {f.name for f in dataclasses.fields(transformers.Qwen3Config)}


def test_defaults_of_absent_moe_keys_are_transformers_defaults():
    ref = transformers.Qwen3MoeConfig()
    ours = Qwen3Config.from_hf_dict({"model_type": "qwen3_moe"})
    for key, value in keys.HF_MOE_DEFAULTS.items():
        want = ref.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(ref, key, None)
        if key == "head_dim":  # no field: Qwen3MoeAttention's fallback
            assert value is None and ours.head_dim == ref.hidden_size // ref.num_attention_heads
        else:
            assert value == want and getattr(ours, key) == want, key


def test_released_30b_config_reads_as_the_preset_and_counts_its_parameters():
    cfg = Qwen3Config.from_hf_dict(QWEN3_30B_A3B_CONFIG)
    assert dataclasses.asdict(cfg) == {**dataclasses.asdict(get_preset("Qwen3-30B-A3B")),
                                       "bos_token_id": 151643, "eos_token_id": 151645}
    assert cfg.num_params == 30_532_122_624  # "30.5B" on the model card
    assert 3.3e9 < cfg.num_active_params < 3.4e9  # "3.3B activated"
    big = get_preset("qwen3-235b-a22b")
    assert (big.num_hidden_layers, big.hidden_size, big.moe_intermediate_size) == (94, 4096, 1536)
    assert 235.0e9 < big.num_params < 235.2e9 and 22.0e9 < big.num_active_params < 22.3e9


def test_transformers_5_spelling_round_trips():
    d = transformers.Qwen3MoeConfig(**{k: v for k, v in TINY_MOE.items() if k != "model_type"}).to_dict()
    assert "num_local_experts" in d and "num_experts" not in d
    cfg = Qwen3Config.from_hf_dict(d)
    assert cfg.num_experts == 6
    back = cfg.to_hf_dict()
    assert back["model_type"] == "qwen3_moe" and back["architectures"] == ["Qwen3MoeForCausalLM"]
    assert Qwen3Config.from_hf_dict(back) == cfg
    assert transformers.Qwen3MoeConfig(**back).num_experts == 6
    with pytest.raises(ConfigError, match="num_local_experts"):
        Qwen3Config.from_hf_dict({**TINY_MOE, "num_local_experts": 5})


@pytest.mark.parametrize("step,only", [(1, []), (2, []), (1, [0, 3]), (3, [1])])
def test_sparse_layers_follow_transformers(step, only):
    d = {**TINY_MOE, "decoder_sparse_step": step, "mlp_only_layers": only}
    ref = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**d))
    cfg = Qwen3Config.from_hf_dict(d)
    want = [i for i, layer in enumerate(ref.model.layers) if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert cfg.sparse_layers == want
    assert cfg.num_params == ref.num_parameters()


def test_moe_keys_are_refused_in_a_dense_config_and_bad_values_named():
    dense = {k: v for k, v in TINY_MOE.items() if k not in keys.MOE_IMPLEMENTED}
    with pytest.raises(ConfigError, match="num_experts"):
        Qwen3Config.from_hf_dict({**dense, "model_type": "qwen3", "num_experts": 4})
    with pytest.raises(ConfigError, match="architectures"):
        Qwen3Config.from_hf_dict({**TINY_MOE, "architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        Qwen3Config.from_hf_dict({**TINY_MOE, "num_experts_per_tok": 7})
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        Qwen3Config.from_hf_dict({**TINY_MOE, "mlp_only_layers": [4]})
    with pytest.raises(ConfigError, match="dense model"):
        Qwen3Config.from_hf_dict({**TINY_MOE, "num_experts": 0})
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):  # Qwen2-MoE's shared expert
        Qwen3Config.from_hf_dict({**TINY_MOE, "shared_expert_intermediate_size": 64})
