"""Option parsing: MindSpeed-LLM script flags, YAML, unknown and bad flags, validation."""

import shlex
from pathlib import Path

import pytest

from qtrain.config import build_parser, dump_flags_markdown, parse_args, resolve_model_config
from qtrain.errors import ConfigError

FIXTURE = Path(__file__).with_name("mindspeed_qwen3_1p7b_flags.txt")


def mindspeed_argv() -> list[str]:
    subst = dict(TOKENIZER_PATH="/model/Qwen3-1point7B", DATA_PATH="/data/enwiki_text_document",
                 CKPT_LOAD_DIR="/ckpt/in", CKPT_SAVE_DIR="/ckpt/out")
    argv = []
    for line in FIXTURE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            argv += shlex.split(line.format(**subst))
    return argv


def test_mindspeed_qwen3_1p7b_script_parses_to_the_1p7b_preset_shape():
    from qtrain.models.presets import get_preset

    cfg = parse_args(mindspeed_argv())
    assert cfg.training.micro_batch_size == 1 and cfg.training.global_batch_size == 32
    assert cfg.optim.lr_decay_style == "cosine" and cfg.optim.adam_beta2 == 0.95
    assert cfg.parallel.pipeline_model_parallel_size == 2 and cfg.parallel.use_distributed_optimizer
    assert cfg.checkpoint.no_load_optim and cfg.checkpoint.no_load_rng
    assert cfg.data.data_path == ["/data/enwiki_text_document"] and cfg.data.split == "100,0,0"
    model = resolve_model_config(cfg)
    preset = get_preset("1.7B")
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings", "attention_bias",
             "rms_norm_eps")
    assert {k: getattr(model, k) for k in shape} == {k: getattr(preset, k) for k in shape}
    assert model.max_position_embeddings == 4096  # the script builds for its sequence length
    assert model.initializer_range == 0.01


def test_unknown_flag_names_it_with_a_hint():
    with pytest.raises(ConfigError, match=r"--micro-batch-sise.*--micro-batch-size"):
        parse_args(["--micro-batch-sise", "2"])
    with pytest.raises(ConfigError, match=r"unsupported flag --fp16: .*bf16"):
        parse_args(["--fp16"])
    with pytest.raises(ConfigError, match=r"unsupported flag --n-shared-experts: Qwen3-MoE has no shared experts"):
        parse_args(["--n-shared-experts", "2"])


def test_abbreviations_are_not_accepted():
    with pytest.raises(ConfigError, match="--micro-batch"):
        parse_args(["--micro-batch", "2"])


def test_bad_values(capsys):
    from qtrain.errors import UsageError

    with pytest.raises(UsageError, match="--micro-batch-size"):
        parse_args(["--micro-batch-size", "two"])
    with pytest.raises(UsageError, match="--lr-decay-style"):
        parse_args(["--lr-decay-style", "step"])
    with pytest.raises(ConfigError, match="--micro-batch-size must be a positive"):
        parse_args(["--micro-batch-size", "0"])
    with pytest.raises(ConfigError, match="--min-lr"):
        parse_args(["--lr", "1e-4", "--min-lr", "1e-3"])
    with pytest.raises(ConfigError, match="--lr-wsd-decay-iters"):
        parse_args(["--lr-decay-style", "WSD"])
    with pytest.raises(ConfigError, match="weight/prefix pairs"):
        parse_args(["--data-path", "0.3", "a", "b"])
    with pytest.raises(ConfigError, match="--split"):
        parse_args(["--split", "a,b"])


def test_compat_flag_with_other_value_warns():
    with pytest.warns(UserWarning, match="--hidden-dropout 0.1: qtrain uses 0.0"):
        parse_args(["--hidden-dropout", "0.1"])


def test_yaml_values_and_command_line_wins(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("micro-batch-size: 4\ntraining:\n  train_iters: 7\n--lr: 0.5\nbf16: true\n")
    cfg = parse_args(["--config", str(y), "--micro-batch-size", "2"])
    assert (cfg.training.micro_batch_size, cfg.training.train_iters, cfg.optim.lr, cfg.training.bf16) == (2, 7, 0.5, True)
    y.write_text("micro-bach-size: 4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown option 'micro_bach_size' \(did you mean micro_batch_size"):
        parse_args(["--config", str(y)])
    y.write_text("lr-decay-style: step\n")
    with pytest.raises(ConfigError, match="--lr-decay-style"):
        parse_args(["--config", str(y)])


def test_shape_flags_override_preset():
    cfg = parse_args(["--model-preset", "tiny", "--num-layers", "2"])
    m = resolve_model_config(cfg)
    assert m.num_hidden_layers == 2 and m.hidden_size == 128


def test_help_and_flag_table_cover_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    table = dump_flags_markdown()
    for flag in ("--micro-batch-size", "--use-flash-attn", "--spec", "--recompute-granularity", "--save-hf"):
        assert flag in out and f"`{flag}`" in table


def test_flops_per_token_matches_the_anchor_convention():
    from qtrain.models.presets import get_preset
    from qtrain.train.metrics import flops_per_token

    # anchors.md: Qwen3-1.7B at T=4096 is 13.14 GFLOP/token (6N + 12 L H Q T, tied embedding once)
    assert round(flops_per_token(get_preset("1.7B"), 4096) / 1e9, 2) == 13.14


def test_megatron_shaped_log_line():
    from qtrain.train.metrics import megatron_log_line

    line = megatron_log_line({"iteration": 10, "consumed_samples": 320, "step_time_ms": 1234.56, "lr": 1.25e-6,
                              "global_batch_size": 32, "loss": 10.5, "grad_norm": 1.2345,
                              "tokens_per_s_per_device": 1000.0, "tflops_per_device": 13.14, "mfu": 0.0133,
                              "mem_gib": 40.0}, 2000)
    assert line.startswith(" iteration       10/    2000 | consumed samples:          320 | "
                           "elapsed time per iteration (ms): 1234.6 | learning rate: 1.250000E-06 | "
                           "global batch size:    32 | lm loss: 1.050000E+01 | grad norm: 1.234 |")
    assert "MFU: 1.3%" in line and "mem (GiB): 40.00" in line


def test_docs_flags_table_is_generated_from_the_dataclasses():
    flags_md = Path(__file__).resolve().parents[2] / "docs" / "flags.md"
    assert flags_md.read_text() == dump_flags_markdown(), "regenerate: python -m qtrain.config > docs/flags.md"
