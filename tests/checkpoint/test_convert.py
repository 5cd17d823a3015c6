"""`qtrain convert` between hf, qtrain (DCP) and mg: byte-identical round trips and clear errors."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from qtrain.checkpoint.convert import main as convert
from qtrain.checkpoint.megatron import RopeThetaWarning, load_megatron_state_dict
from qtrain.checkpoint.sources import open_source
from qtrain.models.hf import read_hf_config
from ckpt_helpers import assert_byte_identical, hf_tensors, make_hf
from tolerances import assert_close_scaled, qwen3_terms


def run(*argv: str | Path) -> None:
    assert convert([str(a) for a in argv]) == 0


def test_hf_mg_tp2_pp2_hf_byte_identical(hf_tied, hf_untied, tmp_path):
    for name, src in (("tied", hf_tied), ("untied", hf_untied)):
        mg, back = tmp_path / f"mg_{name}", tmp_path / f"hf_{name}"
        run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg,
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
        assert (mg / "latest_checkpointed_iteration.txt").read_text() == "1"
        assert sorted(p.name for p in (mg / "iter_0000001").iterdir()) == [
            "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
        run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back)
        assert_byte_identical(hf_tensors(src), hf_tensors(back))
        assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_hf_qtrain_mg_hf_byte_identical(hf_tied, hf_untied, tmp_path):
    for name, src in (("tied", hf_tied), ("untied", hf_untied)):
        q, mg, back = tmp_path / f"q_{name}", tmp_path / f"mg_{name}", tmp_path / f"hf_{name}"
        run("--load-model-type", "hf", "--save-model-type", "qtrain", "--load-dir", src, "--save-dir", q)
        run("--load-model-type", "qtrain", "--save-model-type", "mg", "--load-dir", q, "--save-dir", mg,
            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
        run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back)
        assert_byte_identical(hf_tensors(src), hf_tensors(back))


def test_qtrain_checkpoint_layout(hf_tied, tmp_path):
    """fp32 {"model": {HF name: tensor}} in DCP, config.json and tokenizer beside it, tracker last;
    a tied model also stores lm_head.weight, as the live model's state dict does."""
    q = tmp_path / "q"
    run("--load-model-type", "hf", "--save-model-type", "qtrain", "--load-dir", hf_tied, "--save-dir", q)
    assert (q / "latest_checkpointed_iteration.txt").read_text() == "1"
    folder = q / "iter_0000001"
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert (folder / "tokenizer.json").read_bytes() == (hf_tied / "tokenizer.json").read_bytes()
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert not any(k.startswith("optim") for k in meta)
    src = hf_tensors(hf_tied)
    model = {n: torch.empty(tuple(meta["model." + n].size)) for n in list(src) + ["lm_head.weight"]}
    dcp.load({"model": model}, checkpoint_id=str(folder), no_dist=True)
    assert all(t.dtype == torch.float32 for t in model.values())
    for n, t in src.items():
        assert torch.equal(model[n], t.float()), n
    assert torch.equal(model["lm_head.weight"], src["model.embed_tokens.weight"].float())


def test_qtrain_to_hf_restores_dtype_and_tokenizer(hf_tied, tmp_path):
    q, back = tmp_path / "q", tmp_path / "back"
    run("--load-model-type", "hf", "--save-model-type", "qtrain", "--load-dir", hf_tied, "--save-dir", q)
    run("--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", q, "--save-dir", back)
    assert_byte_identical(hf_tensors(hf_tied), hf_tensors(back))  # bf16 again: the config says so
    assert (back / "tokenizer_config.json").read_bytes() == (hf_tied / "tokenizer_config.json").read_bytes()
    run("--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", q, "--save-dir", tmp_path / "f32",
        "--params-dtype", "fp32")
    assert {t.dtype for t in hf_tensors(tmp_path / "f32").values()} == {torch.float32}


def test_uneven_pp_and_virtual_pipeline_round_trip(hf_untied, tmp_path):
    src = hf_tensors(hf_untied)
    for extra in (["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
                  ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]):
        mg, back = tmp_path / f"mg{len(extra)}{extra[-1]}", tmp_path / f"hf{len(extra)}{extra[-1]}"
        run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_untied, "--save-dir", mg, *extra)
        run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back)
        assert_byte_identical(src, hf_tensors(back))


def test_mg_to_mg_reshard_and_load_state_dict(hf_tied, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", a,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    run("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", a, "--save-dir", b,
        "--target-pipeline-parallel-size", "4", "--params-dtype", "fp32")
    cfg, sd = load_megatron_state_dict(b)
    assert cfg.num_hidden_layers == 4 and cfg.tie_word_embeddings
    src = hf_tensors(hf_tied)
    assert sorted(sd) == sorted(src)
    for n, t in src.items():
        assert sd[n].dtype == torch.float32 and torch.equal(sd[n], t.float()), n


def test_rewriting_a_megatron_dir_replaces_its_iteration(hf_tied, tmp_path):
    """Converting with --overwrite into a dir that holds another layout (PP1 -> TP2 x PP2) leaves no stale ranks."""
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", mg)
    (mg / "iter_0000007").mkdir()  # an older iteration of the previous model: removed as well
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", mg,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--overwrite")
    assert sorted(p.name for p in mg.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert "mp_rank_00" not in [p.name for p in (mg / "iter_0000001").iterdir()]
    _, sd = load_megatron_state_dict(mg)
    assert_byte_identical(hf_tensors(hf_tied), sd)


def test_release_and_explicit_iterations(hf_tied, tmp_path):
    """Megatron's "release" tracker and --iteration both pick the folder to read."""
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", mg)
    (mg / "iter_0000001").rename(mg / "release")
    (mg / "latest_checkpointed_iteration.txt").write_text("release")
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "a")
    assert_byte_identical(hf_tensors(hf_tied), hf_tensors(tmp_path / "a"))
    (mg / "release").rename(mg / "iter_0000005")
    run("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", mg, "--save-dir", tmp_path / "b",
        "--iteration", "5")
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text() == "5"


def test_mindspeed_flags_accepted(hf_tied, tmp_path):
    run("--use-mcore-models", "--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg",
        "--load-dir", hf_tied, "--save-dir", tmp_path / "mg", "--model-type-hf", "qwen3",
        "--tokenizer-model", hf_tied / "tokenizer.json", "--spec", "mindspeed_llm.tasks.models.spec", "layer_spec",
        "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "1")
    assert (tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def test_hf_cfg_dir_for_foreign_megatron(hf_tied, tmp_path):
    """A Megatron checkpoint without qtrain's stored config: shape from args, config.json from --hf-cfg-dir."""
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", mg)
    path = mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=False)
    del obj["args"].qtrain_hf_config  # as MindSpeed-LLM writes it
    obj["args"].tokenizer_name_or_path = str(hf_tied)  # a training run records its tokenizer
    torch.save(obj, path)
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "a")
    assert_byte_identical(hf_tensors(hf_tied), hf_tensors(tmp_path / "a"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (hf_tied / "tokenizer.json").read_bytes()
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "b",
        "--hf-cfg-dir", hf_tied)
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads((hf_tied / "config.json").read_text())
    assert (tmp_path / "b" / "tokenizer.json").is_file()


def test_rope_theta_from_megatron_args_is_said(tmp_path, capsys):
    """MindSpeed-LLM's convert_ckpt.py records rotary_base 10000 when its command line lacks --rotary-base,
    whatever the model's rope_theta: qtrain says where rope_theta comes from, and with --hf-cfg-dir
    uses config.json's, saying that the two disagree."""
    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32, rope_theta=1e6)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg)
    capsys.readouterr()
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "own")
    assert "rope_theta" not in capsys.readouterr().err  # qtrain's own files carry the HF config
    path = mg / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=False)
    del obj["args"].qtrain_hf_config
    obj["args"].rotary_base = 10000
    torch.save(obj, path)

    with pytest.warns(RopeThetaWarning, match="rope_theta=10000 comes from the checkpoint args"):
        open_source("mg", mg).close()  # what generate / evaluate --load see
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "a")
    err = capsys.readouterr().err
    assert "warning:" in err and "rope_theta=10000 comes from the checkpoint args (rotary_base=10000)" in err
    assert "--hf-cfg-dir" in err
    assert read_hf_config(tmp_path / "a").rope_theta == 10000

    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "b",
        "--hf-cfg-dir", src)
    err = capsys.readouterr().err
    assert f"--hf-cfg-dir {src}: rope_theta is 1000000.0 there but 10000.0 from the checkpoint args' rotary_base; " \
           f"using 1000000.0" in err
    assert "comes from the checkpoint args" not in err
    assert read_hf_config(tmp_path / "b").rope_theta == 1e6

    obj["args"].rotary_base = 1000000
    torch.save(obj, path)
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "c",
        "--hf-cfg-dir", src)
    assert "rope_theta" not in capsys.readouterr().err  # they agree


def test_rope_theta_note_knows_the_published_shapes():
    """A foreign checkpoint with a published Qwen3 shape: silent when its rotary_base is that model's,
    named when not; any other shape is told that rope_theta comes from the args."""
    from qtrain.checkpoint.megatron import rope_theta_note
    from qtrain.models.presets import get_preset

    cfg = get_preset("1.7B")
    assert rope_theta_note(argparse.Namespace(rotary_base=1000000), cfg, "f") is None
    cfg.rope_theta = 10000.0
    note = rope_theta_note(argparse.Namespace(rotary_base=10000), cfg, "f")
    assert note.startswith("f: the checkpoint args say rotary_base=10000, but this is the shape of Qwen3-1.7B, "
                           "whose rope_theta is 1000000")
    assert "Using rope_theta=10000 as the args say" in note and "--hf-cfg-dir" in note
    note = rope_theta_note(argparse.Namespace(), cfg, "f")
    assert "say no rotary_base, so Megatron's default 10000" in note
    cfg.hidden_size = 1536
    assert "rope_theta=10000 comes from the checkpoint args" in rope_theta_note(argparse.Namespace(), cfg, "f")


def mindspeed_args(tp: int, pp: int, hf_dir: Path, save_dir: Path) -> argparse.Namespace:
    """`args` as MindSpeed-LLM 2.2.0's convert_ckpt_v2.py writes them for qwen3 (model_cfg.json's base +
    qwen3 entries, the HF config values under its names, the converter's own attributes), field for
    field as it wrote them for this tiny model."""
    args = argparse.Namespace(
        seq_length=4096, global_batch_size=64, add_position_embedding=True, use_rotary_position_embeddings=True,
        add_bias_linear=False, gradient_accumulation_fusion=False, normalization="RMSNorm", swiglu=True,
        tokenizer_type="Llama2Tokenizer", group_query_attention=False, qkv_type="unpack", fc_type="gate_up_down",
        qk_layernorm=True, max_position_embeddings=128, hidden_size=64, num_attention_heads=4, num_layers=4,
        num_key_value_heads=2, vocab_size=256, intermediate_size=96, norm_epsilon=1e-6, tie_word_embeddings=False,
        torch_dtype="bfloat16", rotary_base=10000.0, kv_channels=32, untie_embeddings_and_output_weights=True,
        model_type_hf="qwen3", load_model_type="hf", hf_path=str(hf_dir), load_dir=str(hf_dir),
        save_dir=str(save_dir / "iter_0000001"), tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=1, moe_grouped_gemm=False, moe_tp_extend_ep=False, mla_mm_split=False,
        mtp_num_layers=0, first_k_dense_replace=4, expert_tensor_parallel_size=tp)
    if tp == 1:  # its (tp, ep) pairs, listed when expert_tensor_parallel_size is 1
        args.etp_valid_ckpts_list = [(0, 0)]
    return args


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_reads_mindspeed_converted_checkpoint(hf_untied, tmp_path, capsys, tp, pp):
    """A checkpoint as convert_ckpt_v2 writes it (models in defaultdict(dict), pickle protocol 4, its
    args: group_query_attention False with num_key_value_heads set, intermediate_size, vocab_size)
    converts back exactly without --trust-pickle; rope_theta comes from its args, which is said."""
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_untied, "--save-dir", mg,
        "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp))
    for path in (mg / "iter_0000001").glob("*/model_optim_rng.pt"):
        obj = torch.load(path, weights_only=False)
        model = collections.defaultdict(dict)
        model.update((k, v) for k, v in obj["model"].items() if not k.endswith("._extra_state"))  # it writes none
        torch.save({"args": mindspeed_args(tp, pp, hf_untied, mg), "checkpoint_version": 3.0, "iteration": 1,
                    "model": model}, path, pickle_protocol=4)
    capsys.readouterr()
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "hf")
    assert "rope_theta=10000 comes from the checkpoint args (rotary_base=10000)" in capsys.readouterr().err
    assert_byte_identical(hf_tensors(hf_untied), hf_tensors(tmp_path / "hf"))
    got = json.loads((tmp_path / "hf" / "config.json").read_text())
    want = json.loads((hf_untied / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        assert got[key] == want[key], key
    assert got["rope_theta"] == 10000.0 and got["model_type"] == "qwen3"


def test_padded_megatron_vocab_is_cut_back_with_hf_cfg_dir(hf_untied, tmp_path):
    """Megatron-LM pads the vocabulary (to a multiple of 128 x TP); --hf-cfg-dir restores the HF size."""
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_untied, "--save-dir", mg,
        "--target-tensor-parallel-size", "2")
    paths = [mg / "iter_0000001" / f"mp_rank_{r:02d}" / "model_optim_rng.pt" for r in range(2)]
    objs = [torch.load(p, weights_only=False) for p in paths]
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # pad the full rows, re-split
        full = torch.cat([o["model"][key] for o in objs])
        full = torch.cat([full, torch.zeros(128, full.shape[1], dtype=full.dtype)])
        for o, part in zip(objs, full.chunk(2)):
            o["model"][key] = part.clone()
    for o, p in zip(objs, paths):
        del o["args"].qtrain_hf_config
        o["args"].padded_vocab_size = 384
        torch.save(o, p)
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "padded")
    assert hf_tensors(tmp_path / "padded")["lm_head.weight"].shape[0] == 384
    run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "hf",
        "--hf-cfg-dir", hf_untied)
    assert_byte_identical(hf_tensors(hf_untied), hf_tensors(tmp_path / "hf"))


# ----------------------------------------------------------------------------- errors

def _err(capsys, *argv) -> str:
    from qtrain import cli

    assert cli.main(["convert"] + [str(a) for a in argv]) == 1
    return capsys.readouterr().err


def test_error_unknown_format(hf_tied, tmp_path, capsys):
    from qtrain.errors import UsageError

    with pytest.raises(UsageError, match="invalid choice: 'gguf'"):
        convert(["--load-model-type", "gguf", "--save-model-type", "hf", "--load-dir", str(hf_tied),
                 "--save-dir", str(tmp_path)])
    err = _err(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", hf_tied,
               "--save-dir", tmp_path / "x")
    assert "latest_checkpointed_iteration.txt" in err and "tracker file not found" in err


def test_error_missing_tracker(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for kind in ("mg", "qtrain"):
        err = _err(capsys, "--load-model-type", kind, "--save-model-type", "hf", "--load-dir", tmp_path / "empty",
                   "--save-dir", tmp_path / "x")
        assert "tracker file not found" in err


def test_error_parallel_sizes_must_divide(hf_tied, tmp_path, capsys):
    base = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", tmp_path / "x"]
    assert "num_key_value_heads" in _err(capsys, *base, "--target-tensor-parallel-size", "4")
    assert "num_attention_heads" in _err(capsys, *base, "--target-tensor-parallel-size", "3")
    assert "4 layers do not divide into 3" in _err(capsys, *base, "--target-pipeline-parallel-size", "3")
    assert "summing to the model's 4 layers" in _err(capsys, *base, "--target-pipeline-parallel-size", "2",
                                                     "--num-layer-list", "1,2")
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_error_transformer_engine_names_for_mg_output(hf_tied, tmp_path, capsys):
    """Megatron files are written with local-spec names; asking for Transformer Engine ones is refused by name."""
    err = _err(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied,
               "--save-dir", tmp_path / "x", "--transformer-impl", "transformer_engine")
    assert "--transformer-impl transformer_engine" in err and "local" in err
    assert not (tmp_path / "x").exists()


def test_error_vocab_not_divisible(tmp_path, capsys):
    src = make_hf(tmp_path / "odd", tied=True, dtype=torch.float32, vocab_size=255)
    err = _err(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src,
               "--save-dir", tmp_path / "x", "--target-tensor-parallel-size", "2")
    assert "vocab_size (255)" in err


def test_error_non_qwen3_config(hf_tied, tmp_path, capsys):
    import shutil

    src = tmp_path / "llama"
    shutil.copytree(hf_tied, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src,
               "--save-dir", tmp_path / "x")
    assert "model_type is 'llama'" in err and "qwen3" in err
    assert "Qwen3 only" in _err(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied,
                                "--save-dir", tmp_path / "x", "--model-type-hf", "llama3")


def test_error_missing_megatron_shards_are_named(hf_tied, tmp_path, capsys):
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", mg,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    (mg / "iter_0000001" / "mp_rank_01_000" / "model_optim_rng.pt").unlink()
    import shutil

    shutil.rmtree(mg / "iter_0000001" / "mp_rank_01_001")
    err = _err(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg,
               "--save-dir", tmp_path / "x")
    assert "mp_rank_01_000/model_optim_rng.pt" in err and "mp_rank_01_001/model_optim_rng.pt" in err
    assert "mp_rank_00_000" not in err.split("missing")[1]


def test_error_missing_parameter_in_a_rank_file(hf_tied, tmp_path, capsys):
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", hf_tied, "--save-dir", mg,
        "--target-tensor-parallel-size", "2")
    path = mg / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    obj = torch.load(path, weights_only=False)
    del obj["model"]["decoder.layers.3.mlp.linear_fc2.weight"]
    torch.save(obj, path)
    err = _err(capsys, "--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg,
               "--save-dir", tmp_path / "x")
    assert "mp_rank_01/model_optim_rng.pt: missing parameter 'decoder.layers.3.mlp.linear_fc2.weight'" in err


def test_error_missing_tensor_in_hf_dir(tmp_path, capsys):
    from safetensors.torch import save_file

    src = make_hf(tmp_path / "hf", tied=True, dtype=torch.float32)
    tensors = hf_tensors(src)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    err = _err(capsys, "--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src,
               "--save-dir", tmp_path / "x")
    assert "model.layers.2.mlp.up_proj.weight" in err


def test_qtrain_load_of_megatron_dir_gives_hf_loss(tmp_path):
    """The training loop's --load path (qtrain.checkpoint.dcp.load_checkpoint) takes a TP2 x PP2
    Megatron dir via load_megatron_state_dict; the loss then equals transformers' on the HF original."""
    import transformers

    from qtrain.checkpoint.dcp import load_checkpoint
    from qtrain.models.hf import read_hf_config
    from qtrain.models.qwen3 import Qwen3ForCausalLM

    src = make_hf(tmp_path / "hf", tied=False, dtype=torch.float32, seed=5)
    mg = tmp_path / "mg"
    run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg,
        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    model = Qwen3ForCausalLM(read_hf_config(src))
    assert load_checkpoint(mg, model, None).kind == "megatron"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        loss = model(ids, labels=labels)
        ref = transformers.Qwen3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids, labels=ids).loss
    assert_close_scaled(loss, ref, terms=qwen3_terms(model.config, 16, tokens=30))


def test_training_checkpoint_to_hf_and_mg(tmp_path):
    """A checkpoint written by the training loop (model + AdamW state + train state) exports its
    model exactly; the optimizer state is left behind."""
    from qtrain.checkpoint.dcp import save_checkpoint
    from qtrain.models.config import Qwen3Config
    from qtrain.models.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 8))
    model(ids, labels=ids).backward()
    opt.step()
    save_checkpoint(tmp_path / "save", 7, model, opt, {"iteration": 7}, cfg.to_hf_dict(), {"lr": 1e-3})
    run("--load-model-type", "qtrain", "--save-model-type", "hf", "--load-dir", tmp_path / "save",
        "--save-dir", tmp_path / "hf", "--params-dtype", "fp32")
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once in HF
    assert_byte_identical(want, hf_tensors(tmp_path / "hf"))
    run("--load-model-type", "qtrain", "--save-model-type", "mg", "--load-dir", tmp_path / "save",
        "--save-dir", tmp_path / "mg", "--target-tensor-parallel-size", "2", "--params-dtype", "fp32")
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "7"
    _, sd = load_megatron_state_dict(tmp_path / "mg")
    assert_byte_identical(want, sd)


def test_exported_qtrain_checkpoint_loads_in_training(hf_tied, tmp_path):
    """HF -> qtrain export, then the training loop's loader (weights only) gets exactly the HF weights."""
    from qtrain.checkpoint.dcp import load_checkpoint
    from qtrain.models.hf import read_hf_config
    from qtrain.models.qwen3 import Qwen3ForCausalLM

    run("--load-model-type", "hf", "--save-model-type", "qtrain", "--load-dir", hf_tied, "--save-dir", tmp_path / "q")
    model = Qwen3ForCausalLM(read_hf_config(hf_tied))
    loaded = load_checkpoint(tmp_path / "q", model, None, finetune=True)
    assert loaded.kind == "qtrain"
    for name, t in hf_tensors(hf_tied).items():
        assert torch.equal(model.state_dict()[name], t.float()), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
