"""RoPE scaling (yarn, linear): logits equal transformers' Qwen3ForCausalLM beyond the original
context in both config spellings, and the HF round trip keeps the settings."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qtrain
from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.ops.rope import rope_frequencies

POSITIONS = 300
TINY = dict(model_type="qwen3", vocab_size=151, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# Settings of each yarn knob away from its default.
YARN_VARIANTS = {
    "plain": {},
    "betas": {"beta_fast": 16, "beta_slow": 2},
    "mscales": {"mscale": 0.8, "mscale_all_dim": 0.5},
    "attention_factor": {"attention_factor": 1.3},
    "no_truncate": {"truncate": False},
}


def _config_json(spelling: str, rope: dict, theta: float = 50000.0, **extra) -> dict:
    """config.json as transformers 4 (rope_scaling + rope_theta) or 5 (rope_parameters) spells it."""
    d = {**TINY, **extra}
    if spelling == "rope_scaling":
        d.update(rope_theta=theta, rope_scaling=dict(rope))
    else:
        d["rope_parameters"] = {**rope, "rope_theta": theta}
    return d


def _pair(d: dict):
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**json.loads(json.dumps(d)))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    ours = Qwen3ForCausalLM(Qwen3Config.from_hf_dict(json.loads(json.dumps(d)))).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _logits(hf, ours, positions=POSITIONS):
    ids = torch.randint(0, TINY["vocab_size"], (2, positions), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return hf(input_ids=ids).logits, ours(ids)


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("variant", sorted(YARN_VARIANTS))
def test_yarn_logits_match_transformers_beyond_the_original_context(spelling, variant):
    hf, ours = _pair(_config_json(spelling, {**YARN, **YARN_VARIANTS[variant]}))
    assert hf.model.rotary_emb.rope_type == "yarn"
    inv_freq, scale = rope_frequencies(32, 50000.0, ours.config.rope_scaling)
    assert torch.equal(inv_freq, hf.model.rotary_emb.inv_freq) and scale == hf.model.rotary_emb.attention_scaling
    ref, got = _logits(hf, ours)
    assert _rel(got, ref) <= 1e-5
    # the positions past original_max_position_embeddings are where plain RoPE goes wrong
    plain = Qwen3ForCausalLM(Qwen3Config.from_hf_dict({**TINY, "rope_theta": 50000.0})).eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, POSITIONS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(plain(ids)[:, 64:], ref[:, 64:]) > 1e-2


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_linear_logits_match_transformers(spelling):
    hf, ours = _pair(_config_json(spelling, {"rope_type": "linear", "factor": 2.5}))
    assert hf.model.rotary_emb.rope_type == "linear"
    ref, got = _logits(hf, ours)
    assert _rel(got, ref) <= 1e-5


def test_explicit_factor_wins_over_the_position_ratio_as_in_transformers_5():
    d = _config_json("rope_scaling", YARN, max_position_embeddings=512)  # ratio 8, factor 4
    with pytest.warns(UserWarning, match="factor 4 differs from .* = 8"):
        hf, ours = _pair(d)
    assert ours.config.rope_scaling["factor"] == 4.0
    ref, got = _logits(hf, ours, positions=80)
    assert _rel(got, ref) <= 1e-5


def test_missing_factor_and_original_follow_transformers():
    # transformers: original defaults to max_position_embeddings, factor to max / original
    cfg = Qwen3Config.from_hf_dict({**TINY, "rope_scaling": {"rope_type": "yarn", "factor": None,
                                                             "original_max_position_embeddings": 32}})
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
    cfg = Qwen3Config.from_hf_dict({**TINY, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    assert cfg.rope_scaling["original_max_position_embeddings"] == 256
    cfg = Qwen3Config.from_hf_dict({**TINY, "rope_scaling": {**YARN, "original_max_position_embeddings": 64.0}})
    assert cfg.rope_scaling == YARN and isinstance(cfg.rope_scaling["original_max_position_embeddings"], int)


def test_both_spellings_give_one_canonical_setting():
    a = Qwen3Config.from_hf_dict(_config_json("rope_scaling", {**YARN, "beta_fast": 32, "mscale": 1.0}))
    b = Qwen3Config.from_hf_dict(_config_json("rope_parameters", {**YARN, "type": "yarn", "truncate": True}))
    assert a == b and a.rope_scaling == YARN
    same = {**_config_json("rope_scaling", YARN), "rope_parameters": {**YARN, "rope_theta": 50000.0}}
    assert Qwen3Config.from_hf_dict(same) == a
    other = {**same, "rope_parameters": {**YARN, "factor": 2.0}}
    with pytest.raises(ConfigError, match="describe different RoPE"):
        Qwen3Config.from_hf_dict(other)


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported: transformers recomputes"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, "'llama3' is not supported"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "'longrope' is not supported"),
    ({**YARN, "low_freq_factor": 1.0}, "low_freq_factor not supported with rope_type 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, "beta_fast not supported with rope_type 'linear'"),
    ({"rope_type": "linear"}, "needs a factor"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 64}, "'yarn' needs a factor"),
    ({**YARN, "factor": 0.5}, "factor must be a number >= 1"),
    ({**YARN, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_unimplemented_rope_settings_are_refused_by_name(spelling, rope, match):
    with pytest.raises(ConfigError, match=match):
        Qwen3Config.from_hf_dict(_config_json(spelling, rope))


@pytest.mark.parametrize("rope", [YARN, {**YARN, "beta_fast": 16, "attention_factor": 1.2, "truncate": False},
                                  {"rope_type": "linear", "factor": 2.0}])
def test_hf_round_trip_keeps_the_rope_settings(tmp_path, rope):
    src_cfg = _config_json("rope_parameters", rope)
    hf, ours = _pair(src_cfg)
    qtrain.save_hf(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_scaling"] == ours.config.rope_scaling and written["rope_theta"] == 50000.0
    back = qtrain.load_hf(tmp_path / "out")
    assert back.config == ours.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert reloaded.config.rope_parameters == hf.config.rope_parameters
    ids = torch.randint(0, TINY["vocab_size"], (1, 120), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, hf(input_ids=ids).logits)
