"""Every key of a Qwen3 config.json is implemented (parity-tested here), known not to change the
computation (its reason written in qtrain/models/hf_config_keys.py), or refused by name."""

import dataclasses
import json
import typing

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qtrain
from qtrain.errors import ConfigError
from qtrain.models import hf_config_keys as keys
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM

# Qwen/Qwen3-0.6B's published config.json (written by transformers 4.51.0).
QWEN3_RELEASE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}

# The keys of transformers 4.51.3's Qwen3Config().to_dict() (what save_pretrained(use_diff=False) and
# older tools write), recorded from that version.
TRANSFORMERS_4_KEYS = [
    "_attn_implementation_autoset", "_name_or_path", "add_cross_attention", "architectures", "attention_bias",
    "attention_dropout", "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "eos_token_id", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "head_dim", "hidden_act", "hidden_size", "id2label",
    "initializer_range", "intermediate_size", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "max_position_embeddings", "max_window_layers", "min_length", "model_type",
    "no_repeat_ngram_size", "num_attention_heads", "num_beam_groups", "num_beams", "num_hidden_layers",
    "num_key_value_heads", "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "pad_token_id", "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "rms_norm_eps", "rope_scaling", "rope_theta", "sep_token_id",
    "sliding_window", "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
    "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torch_dtype",
    "torchscript", "transformers_version", "typical_p", "use_bfloat16", "use_cache", "use_sliding_window",
    "vocab_size",
]

TINY = dict(model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
            rope_theta=10000.0, tie_word_embeddings=False)

# A value other than the one qtrain computes, for each key of keys.REQUIRED.
BAD_VALUES = {
    "model_type": "qwen2_moe", "architectures": ["Qwen3ForSequenceClassification"], "hidden_act": "gelu",
    "attention_dropout": 0.1, "use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"],
    "partial_rotary_factor": 0.5, "is_encoder_decoder": True, "add_cross_attention": True,
    "pruned_heads": {"0": [1]}, "torchscript": True,
}


def _categories(key):
    return [name for name, table in (("implemented", keys.IMPLEMENTED), ("no effect", keys.NO_EFFECT),
                                     ("required value", keys.REQUIRED), ("refused", keys.REFUSED)) if key in table]


def test_every_transformers_qwen3_key_is_classified_once():
    fields = {f.name for f in dataclasses.fields(transformers.Qwen3Config)}
    written = set(transformers.Qwen3Config().to_dict())
    for key in sorted(fields | written | set(TRANSFORMERS_4_KEYS) | set(QWEN3_RELEASE_CONFIG)):
        assert len(_categories(key)) == 1, (key, _categories(key))
    assert set(BAD_VALUES) == set(keys.REQUIRED)
    assert all(reason.strip() for reason in keys.NO_EFFECT.values())


def test_defaults_of_absent_keys_are_transformers_defaults():
    ref = transformers.Qwen3Config()
    for key, value in keys.HF_DEFAULTS.items():
        want = ref.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(ref, key)
        assert value == want, key
    ours = Qwen3Config.from_hf_dict({"model_type": "qwen3"})
    assert {k: getattr(ours, k) for k in keys.HF_DEFAULTS} == keys.HF_DEFAULTS
    # null key/value heads means one per query head, as transformers reads it
    assert Qwen3Config.from_hf_dict({**TINY, "num_key_value_heads": None}).num_key_value_heads == 4


def test_release_config_reads_as_the_preset():
    cfg = Qwen3Config.from_hf_dict(QWEN3_RELEASE_CONFIG)
    from qtrain.models.presets import get_preset

    want = get_preset("0.6B")
    assert dataclasses.asdict(cfg) == {**dataclasses.asdict(want), "bos_token_id": 151643, "eos_token_id": 151645}


def _pair(d, seed=0):
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**d)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(1.0, 0.1)
    ours = Qwen3ForCausalLM(Qwen3Config.from_hf_dict(json.loads(json.dumps(d)))).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _assert_same_logits(d, positions=40):
    hf, ours = _pair(d)
    ids = torch.randint(0, d["vocab_size"], (2, positions), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, ours(ids)
    assert _rel(got, ref) <= 1e-5


def test_implemented_keys_with_non_default_values_match_transformers():
    # every implemented key away from its default at once, read from the config transformers writes
    d = transformers.Qwen3Config(**TINY, rms_norm_eps=1e-5, attention_bias=True, initializer_range=0.05,
                                 bos_token_id=3, eos_token_id=[4, 5]).to_diff_dict()
    d["rope_parameters"]["rope_theta"] = 5000.0
    cfg = Qwen3Config.from_hf_dict(d)
    assert (cfg.rms_norm_eps, cfg.attention_bias, cfg.rope_theta, cfg.eos_token_id) == (1e-5, True, 5000.0, [4, 5])
    _assert_same_logits(d)


def test_no_effect_keys_change_nothing():
    base = dict(TINY)
    noisy = {**base, "pad_token_id": 3, "use_cache": False, "sliding_window": 5, "max_window_layers": 1,
             "chunk_size_feed_forward": 4, "is_decoder": True, "output_hidden_states": True, "return_dict": False,
             "dtype": "bfloat16", "id2label": {"0": "a", "1": "b"}, "problem_type": "regression",
             "tokenizer_class": "Qwen2Tokenizer", "prefix": "x", "temperature": 0.3, "top_k": 3,
             "transformers_version": "4.51.0", "_name_or_path": "somewhere", "sep_token_id": 7}
    assert set(noisy) - set(base) <= set(keys.NO_EFFECT)
    assert Qwen3Config.from_hf_dict(noisy) == Qwen3Config.from_hf_dict(base)
    noisy["return_dict"] = True  # transformers' own forward needs it to return .logits
    _assert_same_logits(noisy)


@pytest.mark.parametrize("key", ["head_dim", "hidden_size", "num_hidden_layers"])
def test_null_or_non_integer_shapes_are_named(key):
    for bad in (None, 2.5, "8"):
        with pytest.raises(ConfigError, match=f"{key} must be a positive integer"):
            Qwen3Config.from_hf_dict({**TINY, key: bad})


@pytest.mark.parametrize("key", sorted(keys.REQUIRED))
def test_required_keys_refuse_other_values_by_name(key):
    with pytest.raises(ConfigError, match=key):
        Qwen3Config.from_hf_dict({**TINY, key: BAD_VALUES[key]})


@pytest.mark.parametrize("key", sorted(keys.REFUSED) + ["unsloth_version", "mlp_only_layers"])
def test_refused_and_unknown_keys_are_named(key):
    with pytest.raises(ConfigError, match=key):
        Qwen3Config.from_hf_dict({**TINY, key: {"x": 1}})


# --- RoPE: both spellings -------------------------------------------------------------------------


def test_every_rope_parameters_key_is_implemented_for_its_types_and_refused_for_the_others():
    from qtrain.models.rope_scaling import SPELLINGS, TYPE_KEYS

    assert SPELLINGS == ("rope_scaling", "rope_parameters")
    rope_keys = set(typing.get_type_hints(transformers.modeling_rope_utils.RopeParameters))
    implemented = set().union(*TYPE_KEYS.values()) - {"type"}  # "type": transformers 4's alias of rope_type
    # tests/models/test_rope_scaling.py checks each against transformers' logits (partial_rotary_factor: 1 only)
    assert implemented == {"rope_type", "rope_theta", "partial_rotary_factor", "factor",
                           "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate"}
    assert implemented <= rope_keys
    required = {"linear": {"factor": 2.0}, "yarn": {"factor": 2.0, "original_max_position_embeddings": 16}}
    for rope_type, allowed in TYPE_KEYS.items():
        for key in sorted(rope_keys - allowed):
            for spelling in SPELLINGS:
                rope = {"rope_type": rope_type, **required.get(rope_type, {}), key: 2.0}
                with pytest.raises(ConfigError, match=f"{spelling}.*{key}"):
                    Qwen3Config.from_hf_dict({**TINY, spelling: rope})


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_every_path_that_reads_a_config_reads_its_rope_scaling(tmp_path, spelling):
    import argparse

    from qtrain.checkpoint.megatron import config_from_args
    from qtrain.checkpoint.sources import open_source
    from qtrain.config import parse_args, resolve_model_config

    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d.pop("rope_parameters")
    reads = (lambda: qtrain.load_hf(tmp_path).config, lambda: open_source("hf", tmp_path).config,
             lambda: resolve_model_config(parse_args(["--load", str(tmp_path)])),
             lambda: config_from_args(argparse.Namespace(qtrain_hf_config=d), "args", {}, 1)[0])
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    d[spelling] = yarn
    (tmp_path / "config.json").write_text(json.dumps(d))
    for read in reads:
        assert read().rope_scaling == yarn
    d[spelling] = {"rope_type": "dynamic", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    for read in reads:
        with pytest.raises(ConfigError, match=f"{spelling}.*dynamic"):
            read()
    # MindSpeed-LLM's args spelling of a type qtrain does not implement
    args = argparse.Namespace(normalization="RMSNorm", swiglu=True, qk_layernorm=True, rope_scaling_type="longrope")
    with pytest.raises(ConfigError, match="rope_scaling_type='longrope'"):
        config_from_args(args, "args", {}, 1)


def test_transformers_5_spelling_reads_rope_theta():
    d = transformers.Qwen3Config(**{**TINY, "rope_theta": 123456.0}).to_diff_dict()
    assert "rope_theta" not in d and d["rope_parameters"]["rope_theta"] == 123456.0
    assert Qwen3Config.from_hf_dict(d).rope_theta == 123456.0


def test_conflicting_rope_spellings_are_refused():
    with pytest.raises(ConfigError, match="rope_theta"):
        Qwen3Config.from_hf_dict({**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}})
    with pytest.raises(ConfigError, match="rope_type 'default' and type 'linear'"):
        Qwen3Config.from_hf_dict({**TINY, "rope_scaling": {"rope_type": "default", "type": "linear"}})
