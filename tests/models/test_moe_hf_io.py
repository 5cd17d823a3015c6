"""Qwen3-MoE HF dirs: per-expert tensors on disk (as released checkpoints and transformers 5.24's
save_pretrained write them) <-> qtrain's stacked experts, byte for byte; stacked files read too;
sources name experts per expert."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file

import qtrain
from qtrain.checkpoint.sources import open_source
from qtrain.errors import CheckpointError
from qtrain.models.hf import iter_safetensors
from tolerances import assert_close_scaled, qwen3_terms

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**CFG)).eval()
    path = tmp_path_factory.mktemp("moe") / "src"
    hf.save_pretrained(path, max_shard_size="40KB")  # sharded, with an index
    return hf, path


def test_round_trip_is_byte_identical_and_per_expert(hf_dir, tmp_path):
    hf, src = hf_dir
    names = set(dict(iter_safetensors(src)))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in names  # what transformers 5.24 writes
    model = qtrain.load_hf(src)
    assert model.model.layers["0"].mlp.experts.gate_up_proj.shape == (4, 32, 32)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert_close_scaled(model(ids), hf(input_ids=ids).logits, terms=qwen3_terms(model.config, 9))
    out = tmp_path / "out"
    qtrain.save_hf(model, out, max_shard_bytes=40_000)
    a, b = dict(iter_safetensors(src)), dict(iter_safetensors(out))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen3_moe" and written["num_experts"] == 4
    again = transformers.Qwen3MoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_stacked_files_read_as_well(hf_dir, tmp_path):
    hf, src = hf_dir
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(stacked / "model.safetensors"))
    (stacked / "config.json").write_text((src / "config.json").read_text())
    a, b = qtrain.load_hf(src).state_dict(), qtrain.load_hf(stacked).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source = open_source("hf", stacked)
    per_expert = "model.layers.2.mlp.experts.1.gate_proj.weight"
    assert per_expert in source.names() and "model.layers.2.mlp.experts.gate_up_proj" not in source.names()
    assert torch.equal(source.get(per_expert), a["model.layers.2.mlp.experts.gate_up_proj"][1, :16])
    per_file = open_source("hf", src)
    assert per_file.names() == source.names()
    for name in ("model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"):
        assert torch.equal(per_file.get(name), a[name])


def test_missing_expert_is_named(hf_dir, tmp_path):
    hf, src = hf_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    sd = dict(iter_safetensors(src))
    del sd["model.layers.2.mlp.experts.3.down_proj.weight"]
    save_file(sd, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match="experts.3.down_proj"):
        qtrain.load_hf(broken)
    with pytest.raises(CheckpointError, match="experts.3.down_proj"):
        open_source("hf", broken)


def test_convert_hf_to_qtrain_and_back_is_byte_identical(hf_dir, tmp_path):
    from qtrain.checkpoint.dcp_export import save_qtrain
    from qtrain.checkpoint.writers import save_hf_dir

    _, src = hf_dir
    save_qtrain(open_source("hf", src), tmp_path / "q", 0)
    source = open_source("qtrain", tmp_path / "q")
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in source.names()
    save_hf_dir(source, tmp_path / "back")
    a, b = dict(iter_safetensors(src)), dict(iter_safetensors(tmp_path / "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loading_holds_at_most_one_layers_stacks(hf_dir):
    """Streaming: per-expert tensors read in file order are handed on as soon as their stack is
    complete, so at most the two stacks of one layer are pending."""
    from qtrain.models.hf_experts import ExpertStacker

    _, src = hf_dir
    stacker, most, done = ExpertStacker(4), 0, []
    for name, tensor in iter_safetensors(src):
        done += [n for n, _ in stacker.add(name, tensor)]
        most = max(most, len(stacker._buffers))
    assert most <= 2 and not stacker.missing()
    assert {n for n in done if n.endswith("_proj") and ".experts." in n} == {
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 2) for p in ("gate_up_proj", "down_proj")}
