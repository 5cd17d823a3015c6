"""MindSpeed-LLM 2.2.0's Qwen3-MoE scripts (flag lists in mindspeed_qwen3_30b_a3b*_flags.txt): they
parse and dry-run unchanged; MoE flags agree with the model or are refused naming both values; MoE
features qtrain does not have are refused by name."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from qtrain.config import parse_args, resolve_model_config
from qtrain.errors import ConfigError

HERE = Path(__file__).parent
SUBST = dict(TOKENIZER_PATH="/model/Qwen3-30B-A3B", DATA_PATH="/data/alpaca", CKPT_LOAD_DIR="/ckpt/in",
             CKPT_SAVE_DIR="/ckpt/out")


def script_argv(name: str) -> list[str]:
    argv = []
    for line in (HERE / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            argv += shlex.split(line.format(**SUBST))
    return argv


PRETRAIN, TUNE_FULL, TUNE_LORA = ("mindspeed_qwen3_30b_a3b_flags.txt", "mindspeed_qwen3_30b_a3b_tune_full_flags.txt",
                                  "mindspeed_qwen3_30b_a3b_tune_lora_flags.txt")


def test_30b_a3b_pretrain_script_parses():
    cfg = parse_args(script_argv(PRETRAIN))
    moe = cfg.moe
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size, moe.norm_topk_prob) == (128, 8, 768, True)
    assert moe.expert_model_parallel_size == 8 and moe.moe_token_dispatcher_type == "alltoall_seq"
    assert moe.moe_aux_loss_coeff == 0.001 and moe.moe_layer_freq == "-1" and moe.first_k_dense_replace == -1
    assert cfg.parallel.pipeline_model_parallel_size == 2 and cfg.training.global_batch_size == 256


@pytest.mark.parametrize("name", [TUNE_FULL, TUNE_LORA])
def test_30b_a3b_tune_scripts_parse(name):
    from qtrain.train.sft import split_argv

    sft, rest = split_argv(script_argv(name))
    cfg = parse_args(rest)
    assert cfg.moe.num_experts == 128 and cfg.checkpoint.finetune
    assert (sft.lora_r is not None) == (name == TUNE_LORA)


def test_refused_moe_options_are_named():
    base = ["--model-preset", "tiny"]
    for argv, message in [
        (["--moe-router-load-balancing-type", "sinkhorn"], "implements aux_loss"),
        (["--moe-token-dispatcher-type", "allgather"], "use alltoall"),
        (["--n-shared-experts", "2"], "no shared experts"),
        (["--noop-layers", "94,95"], "--num-layer-list"),
        (["--moe-expert-capacity-factor", "1.5"], "drops no tokens"),
        (["--moe-layer-freq", "0"], "--moe-layer-freq 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_args(base + argv)


def test_moe_flags_on_a_dense_model_are_refused():
    with pytest.raises(ConfigError, match="--moe-router-topk 8: the model of --model-preset tiny has no experts"):
        resolve_model_config(parse_args(["--model-preset", "tiny", "--moe-router-topk", "8"]))
    with pytest.raises(ConfigError, match="--expert-model-parallel-size: the model has no experts"):
        resolve_model_config(parse_args(["--model-preset", "tiny", "--expert-model-parallel-size", "2"]))
    # MindSpeed-LLM's dense Qwen3 scripts pass --norm-topk-prob: no router, no effect
    assert resolve_model_config(parse_args(["--model-preset", "tiny", "--norm-topk-prob"])).hidden_size == 128
