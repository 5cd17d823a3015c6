"""RoPE scaling through conversion: HF <-> Megatron keeps it, and the Megatron args carry it in
MindSpeed-LLM's names (yarn) / Megatron-LM's (linear), which read back to the same model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ckpt_helpers import make_hf

from qtrain import cli
from qtrain.checkpoint.megatron import MegatronReader
from qtrain.models.config import Qwen3Config

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def run(*argv) -> int:
    return cli.main(["convert", *[str(a) for a in argv]])


def strip_qtrain_config(mg: Path) -> None:
    """Make the rank files look written by Megatron-LM / MindSpeed-LLM: no qtrain HF config in args."""
    for file in mg.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        obj = torch.load(file, weights_only=False)
        del obj["args"].qtrain_hf_config
        torch.save(obj, file)


@pytest.mark.parametrize("rope, want_args", [
    ({**YARN, "beta_fast": 16, "mscale": 0.8, "mscale_all_dim": 0.5},
     dict(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_scaling_original_max_position_embeddings=32,
          max_position_embeddings=128, beta_fast=16, beta_slow=1, rope_scaling_mscale=0.8,
          rope_scaling_mscale_all_dim=0.5)),
    ({**YARN, "attention_factor": 1.5},  # MindSpeed: mscale(4, m) / mscale(4, 0) = 1.5
     dict(rope_scaling_mscale=0.5 / (0.1 * math.log(4.0)), rope_scaling_mscale_all_dim=0.0)),
    ({"rope_type": "linear", "factor": 2.0}, dict(rotary_seq_len_interpolation_factor=2)),
], ids=["yarn", "yarn_attention_factor", "linear"])
def test_hf_to_megatron_and_back_keeps_rope_scaling(tmp_path, rope, want_args):
    src = make_hf(tmp_path / "hf", tied=False, dtype=torch.float32, rope_parameters=rope)
    want = Qwen3Config.from_json(src / "config.json").rope_scaling
    mg = tmp_path / "mg"
    assert run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg,
               "--target-tensor-parallel-size", "2") == 0
    args = torch.load(next(mg.glob("iter_*/mp_rank_00/model_optim_rng.pt")), weights_only=False)["args"]
    assert {k: getattr(args, k) for k in want_args} == want_args
    back = tmp_path / "back"
    assert run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", back) == 0
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # A MindSpeed-LLM job's args (no qtrain config) describe the same RoPE.
    strip_qtrain_config(mg)
    assert MegatronReader(mg).config.rope_scaling == want
    bare = tmp_path / "bare"
    assert run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", bare) == 0
    assert Qwen3Config.from_json(bare / "config.json").rope_scaling == want
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    import transformers

    with torch.no_grad():
        ref = transformers.Qwen3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
        got = transformers.Qwen3ForCausalLM.from_pretrained(bare, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(ref, got)


def test_megatron_cannot_carry_yarn_settings_mindspeed_has_no_flag_for(tmp_path, capsys):
    src = make_hf(tmp_path / "hf", tied=False, dtype=torch.float32, rope_parameters={**YARN, "truncate": False})
    assert run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", tmp_path / "mg") != 0
    assert "truncate=False: MindSpeed-LLM has no flag" in capsys.readouterr().err
    assert not list((tmp_path / "mg").glob("**/*.pt"))


def test_hf_cfg_dir_must_agree_on_rope_scaling(tmp_path, capsys):
    src = make_hf(tmp_path / "hf", tied=False, dtype=torch.float32, rope_parameters=YARN)
    plain = make_hf(tmp_path / "plain", tied=False, dtype=torch.float32)
    mg = tmp_path / "mg"
    assert run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", src, "--save-dir", mg) == 0
    assert run("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg, "--save-dir", tmp_path / "o",
               "--hf-cfg-dir", plain) != 0
    assert "rope_scaling is None there but {'rope_type': 'yarn'" in capsys.readouterr().err
