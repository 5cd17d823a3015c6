"""load_hf / save_hf: real HF directories in, HF directories out, clear errors."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qtrain
from qtrain.errors import CheckpointError, ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.models.hf import iter_safetensors
from tolerances import assert_close_scaled, qwen3_terms


def _hf_model(tied: bool, seed: int = 0):
    cfg = Qwen3Config(vocab_size=199, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.to_hf_dict("float32"))).eval()


def _tensors(path):
    return dict(iter_safetensors(path))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", [False, True])
def test_round_trip_is_byte_identical_and_loads_in_transformers(tmp_path, tied, shard):
    hf = _hf_model(tied)
    src = tmp_path / "src"
    hf.save_pretrained(src, max_shard_size="20KB" if shard else "5GB")
    assert (src / "model.safetensors.index.json").exists() == shard

    model = qtrain.load_hf(src)
    ids = torch.randint(0, 199, (2, 11))
    with torch.no_grad():
        assert_close_scaled(model(ids), hf(input_ids=ids).logits, terms=qwen3_terms(model.config, 11))

    out = tmp_path / "out"
    qtrain.save_hf(model, out, max_shard_bytes=20_000 if shard else 5 * 10**9)
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (out / "model.safetensors.index.json").exists() == shard
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_load_bf16_and_device(tmp_path):
    _hf_model(True).save_pretrained(tmp_path)
    model = qtrain.load_hf(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_hf_copies_tokenizer_files(tmp_path, tokenizer_dir):
    _hf_model(True).save_pretrained(tmp_path / "src")
    qtrain.save_hf(qtrain.load_hf(tmp_path / "src"), tmp_path / "out", tokenizer_dir=tokenizer_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_missing_dir_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        qtrain.load_hf(tmp_path / "nope")


def test_non_qwen3_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="llama"):
        qtrain.load_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_model(False).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        qtrain.load_hf(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "model.layers.9.extra.weight" in str(e.value)


def test_shape_mismatch_is_named(tmp_path):
    _hf_model(True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 160
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape"):
        qtrain.load_hf(tmp_path)


def test_save_writes_weights_before_config(tmp_path, monkeypatch):
    """A save interrupted while writing weights leaves no config.json (so nothing looks complete)."""
    import qtrain.models.hf as hf_mod

    model = qtrain.load_hf(_save(tmp_path / "src"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", boom)
    with pytest.raises(RuntimeError):
        qtrain.save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors"))


def _save(path):
    _hf_model(True).save_pretrained(path)
    return path
