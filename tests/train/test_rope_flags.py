"""RoPE scaling flags (MindSpeed-LLM's yarn names, Megatron-LM's linear one) -> the model config,
computing what MindSpeed-LLM computes; refusals by name; dry run and plan of a 1.7B yarn job."""

import json
import math

import pytest
import torch

from qtrain import cli
from qtrain.config import parse_args, resolve_model_config
from qtrain.errors import ConfigError
from qtrain.ops.rope import rope_frequencies

TINY = ["--model-preset", "tiny", "--max-position-embeddings", "256"]
YARN = ["--rope-scaling-type", "yarn", "--rope-scaling-original-max-position-embeddings", "64"]


def model_config(*argv):
    return resolve_model_config(parse_args([*TINY, *argv]))


def test_yarn_flags_give_the_hf_rope_scaling():
    cfg = model_config(*YARN, "--rope-scaling-factor", "4", "--beta-fast", "16")
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 16.0}
    # as MindSpeed-LLM: without --rope-scaling-factor the factor is max positions / original
    assert model_config(*YARN).rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("mscale, mscale_all_dim", [(None, None), (0.8, 0.5), (2.0, None), (0.0, 0.7)])
@pytest.mark.parametrize("betas", [(None, None), (16, 2)])
def test_yarn_flags_compute_what_mindspeed_computes(mscale, mscale_all_dim, betas):
    """MindSpeed-LLM 2.2.0 (apply_yarn_scaling, apply_rotary_pos_emb_bshd) computes a dense model's
    YaRN with megatron-core's helpers: factor = max_position_embeddings / original, cos/sin times
    mscale(factor, --rope-scaling-mscale) / mscale(factor, --rope-scaling-mscale-all-dim)."""
    yarn = pytest.importorskip("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding")
    argv = list(YARN)
    for flag, value in (("--rope-scaling-mscale", mscale), ("--rope-scaling-mscale-all-dim", mscale_all_dim),
                        ("--beta-fast", betas[0]), ("--beta-slow", betas[1])):
        if value is not None:
            argv += [flag, str(value)]
    cfg = model_config(*argv)
    inv_freq, scale = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    dim, base, factor = cfg.head_dim, cfg.rope_theta, 256 / 64
    beta_fast, beta_slow = betas[0] or 32, betas[1] or 1  # MindSpeed's defaults
    ms, msa = 1.0 if mscale is None else mscale, 0.0 if mscale_all_dim is None else mscale_all_dim
    ratio = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    low, high = yarn._yarn_find_correction_range(beta_fast, beta_slow, dim, base, 64)
    keep = 1.0 - yarn._yarn_linear_ramp_mask(low, high, dim // 2, device="cpu")
    want = (1.0 / (factor * ratio)) * (1 - keep) + (1.0 / ratio) * keep
    assert (inv_freq - want).abs().max() <= 1e-6 * want.abs().max()
    assert math.isclose(scale, yarn._yarn_get_mscale(factor, ms) / yarn._yarn_get_mscale(factor, msa), rel_tol=1e-12)


def test_linear_flags():
    want = {"rope_type": "linear", "factor": 2.0}
    assert model_config("--rope-scaling-type", "linear", "--rope-scaling-factor", "2").rope_scaling == want
    assert model_config("--rotary-seq-len-interpolation-factor", "2").rope_scaling == want


def test_flags_override_and_keep_the_loaded_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "rope_theta": 10000.0})
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**d)).save_pretrained(tmp_path)
    load = ["--load", str(tmp_path)]
    assert resolve_model_config(parse_args(load)).rope_scaling["rope_type"] == "yarn"
    linear = resolve_model_config(parse_args(load + ["--rope-scaling-type", "linear", "--rope-scaling-factor", "3"]))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 3.0}


@pytest.mark.parametrize("argv, message", [
    (["--beta-fast", "16"], "--beta-fast needs --rope-scaling-type yarn"),
    (["--rope-scaling-factor", "4"], "--rope-scaling-factor needs --rope-scaling-type yarn"),
    (["--rope-scaling-type", "yarn"], "needs --rope-scaling-original-max-position-embeddings"),
    (["--rope-scaling-type", "linear"], "linear needs --rope-scaling-factor"),
    (["--rope-scaling-type", "linear", "--rope-scaling-factor", "2", "--beta-slow", "2"], "--beta-slow applies to"),
    (["--rope-scaling-type", "yarn", "--rotary-seq-len-interpolation-factor", "2"], "give one"),
    (["--rope-scaling-type", "llama3"], "--rope-scaling-type llama3: not supported"),
    (["--rope-scaling-type", "dynamic"], "--rope-scaling-type dynamic: not supported: transformers recomputes"),
    ([*YARN, "--rope-scaling-factor", "0.5"], "factor must be a number >= 1"),
    (["--position-embedding-type", "yarn"], "--position-embedding-type yarn: give MindSpeed-LLM's --rope-scaling-type"),
    (["--use-rope-scaling"], "unsupported flag --use-rope-scaling: Llama-3"),
    (["--rope-scaling-beta-fast", "8"], "use --beta-fast"),
    (["--rotary-percent", "0.5"], "partial RoPE"),
])
def test_rope_flags_qtrain_does_not_implement_are_refused_by_name(argv, message):
    with pytest.raises(ConfigError, match=message):
        model_config(*argv)


QWEN3_1P7B_32K_YARN = ["--model-preset", "1.7B", "--seq-length", "32768", "--max-position-embeddings", "131072",
                       "--rope-scaling-type", "yarn", "--rope-scaling-factor", "4",
                       "--rope-scaling-original-max-position-embeddings", "32768", "--bf16",
                       "--context-parallel-size", "8", "--micro-batch-size", "1", "--global-batch-size", "8"]


def test_dry_run_and_plan_of_a_1p7b_yarn_job_at_32k_on_8_devices(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert cli.main(["pretrain", *QWEN3_1P7B_32K_YARN, "--train-iters", "10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "positions    RoPE theta 1e+06, yarn x4 from 32768 positions; max_position_embeddings 131072" in out
    assert "world 8 = TP 1 x PP 1 x CP 8 x DP 1" in out and "seq 32768" in out
    assert cli.main(["plan", *QWEN3_1P7B_32K_YARN, "--world-size", "8", "--device-memory-gb", "64"]) == 0
    out = capsys.readouterr().out
    assert "layout cp8 on 8 devices, seq 32768" in out and "yarn x4 from 32768 positions" in out
    assert "fits in 64 GB per device" in out


def test_yarn_config_is_recorded_for_the_checkpoint():
    cfg = resolve_model_config(parse_args(QWEN3_1P7B_32K_YARN))
    d = cfg.to_hf_dict("float32")
    assert d["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert json.loads(json.dumps(d))["rope_theta"] == 1e6


def test_pretraining_with_yarn_flags_trains_and_exports_the_scaled_model(tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_pretrain import _first_batch_loss
    from trainutil import tiny_args

    from qtrain.models.config import Qwen3Config
    from qtrain.models.hf import load_hf
    from qtrain.models.qwen3 import build_model
    from qtrain.parallel.weights import materialize
    from qtrain.train.loop import pretrain

    argv = tiny_args(tiny_data, train_iters=3, max_position_embeddings=64, save_hf=tmp_path / "hf") + [
        "--rope-scaling-type", "yarn", "--rope-scaling-original-max-position-embeddings", "8"]
    cfg = parse_args(argv)
    run = pretrain(cfg, log=lambda *a, **k: None)
    # the first loss is the seeded initial model's with YaRN, not with plain RoPE
    model_cfg = resolve_model_config(cfg)
    assert model_cfg.rope_scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8}
    initial = materialize(build_model(model_cfg, "meta"), "cpu", seed=cfg.training.seed)
    assert run.losses[1] == pytest.approx(_first_batch_loss(initial, tiny_data), rel=1e-6)
    initial.config = Qwen3Config(**{**vars(model_cfg), "rope_scaling": None})
    assert abs(run.losses[1] - _first_batch_loss(initial, tiny_data)) > 1e-3
    # the exported HF dir is the scaled model for transformers too
    ours = load_hf(tmp_path / "hf")
    assert ours.config.rope_scaling == model_cfg.rope_scaling
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert (ours(ids) - ref).abs().max() <= 1e-5 * ref.abs().max()
