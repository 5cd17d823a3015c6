"""The scripts in examples/qwen3_moe as users run them (bash, variables only): the commands they
build (QTRAIN_PRINT_ONLY=1; recipes stated here independently of common.sh), and in tiny mode on CPU
the conversion round trip and a training run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "qwen3_moe"
# (NPUS_PER_NODE, NNODES, TP, PP, EP, MBS, GBS): MindSpeed-LLM's nodes, EP, MBS, GBS; TP 1; LoRA EP 1
RECIPES = {
    ("30b_a3b", "pretrain"): (8, 2, 1, 1, 8, 1, 256), ("30b_a3b", "full"): (8, 2, 1, 1, 8, 4, 64),
    ("30b_a3b", "lora"): (8, 1, 1, 1, 1, 8, 64),
    ("235b_a22b", "pretrain"): (16, 16, 1, 2, 32, 1, 1024), ("235b_a22b", "full"): (16, 16, 1, 2, 32, 1, 1024),
    ("235b_a22b", "lora"): (16, 16, 1, 2, 1, 1, 256),
}
VARIABLES = ("NPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT CKPT_LOAD_DIR CKPT_SAVE_DIR DATA_PATH "
             "TOKENIZER_PATH TP PP EP MBS GBS SEQ_LENGTH TRAIN_ITERS LR MIN_LR SAVE_INTERVAL LOG_INTERVAL LOG_DIR "
             "LOG_FILE DEVICE MODEL_SIZE LORA_R LORA_ALPHA LORA_TARGET_MODULES QTRAIN_TINY QTRAIN_PRINT_ONLY "
             "GROUPED_GEMM RECOMPUTE HF_CFG_DIR TINY_PRESET").split()


def script_name(size: str, task: str) -> str:
    return f"pretrain_qwen3_{size}_4k.sh" if task == "pretrain" else f"tune_qwen3_{size}_4k_{task}.sh"


def run(script: str, *args: str, **variables) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(QTRAIN_TINY="1", PYTHON=sys.executable, MASTER_PORT=str(port))
    env.update({k: str(v) for k, v in variables.items()})
    return subprocess.run(["bash", str(EXAMPLES / script), *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}"
    return out.stdout


def printed(script: str, **variables) -> list[str]:
    paths = dict(DATA_PATH="/data/alpaca", CKPT_SAVE_DIR="/nonexistent/save", CKPT_LOAD_DIR="/model/qwen3-moe",
                 TOKENIZER_PATH="/model/qwen3-moe")
    return ok(run(script, QTRAIN_PRINT_ONLY=1, **{"QTRAIN_TINY": "0", **paths, **variables})).strip().split()


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("size,task", sorted(RECIPES))
def test_defaults_are_the_recipe(size, task):
    command = printed(script_name(size, task))
    npus, nnodes, tp, pp, ep, mbs, gbs = RECIPES[size, task]
    assert flag(command, "--nproc_per_node") == str(npus) and flag(command, "--nnodes") == str(nnodes)
    assert flag(command, "--tensor-model-parallel-size") == str(tp)
    assert flag(command, "--pipeline-model-parallel-size") == str(pp)
    assert flag(command, "--micro-batch-size") == str(mbs) and flag(command, "--global-batch-size") == str(gbs)
    assert flag(command, "--model-preset") == size.replace("_", "-").upper() and "--bf16" in command
    assert "--use-distributed-optimizer" in command and flag(command, "--recompute-granularity") == "full"
    assert flag(command, "--expert-model-parallel-size") == str(ep)
    assert command[command.index("qtrain") + 1] == ("pretrain" if task == "pretrain" else "sft")
    assert ("--lora-r" in command) == (task == "lora")


def test_conversion_scripts_split_for_mindspeeds_training_layout():
    command = printed("ckpt_convert_qwen3_moe_hf_to_mg.sh")
    assert flag(command, "--target-expert-parallel-size") == "8" and "--moe-grouped-gemm" in command
    assert flag(command, "--model-type-hf") == "qwen3-moe"
    command = printed("ckpt_convert_qwen3_moe_hf_to_mg.sh", MODEL_SIZE="235B-A22B", GROUPED_GEMM=0, EP=16)
    assert flag(command, "--target-expert-parallel-size") == "16" and "--moe-grouped-gemm" not in command
    assert flag(command, "--target-pipeline-parallel-size") == "2"
    command = printed("ckpt_convert_qwen3_moe_mg_to_hf.sh", HF_CFG_DIR="/model/Qwen3-30B-A3B")
    assert flag(command, "--hf-cfg-dir") == "/model/Qwen3-30B-A3B" and "--moe-grouped-gemm" in command
    assert "--target-expert-parallel-size" not in command


def test_tiny_mode_uses_a_moe_preset_and_arguments_win():
    out = ok(run("pretrain_qwen3_235b_a22b_4k.sh", "--lr", "3e-4", QTRAIN_PRINT_ONLY=1, DATA_PATH="/d",
                 CKPT_SAVE_DIR="/s")).strip().split()
    assert flag(out, "--model-preset") == "tiny-moe" and flag(out, "--device") == "cpu"
    assert out[-2:] == ["--lr", "3e-4"] and "--bf16" not in out


def test_conversion_scripts_round_trip_exactly(tmp_path):
    """A tiny transformers Qwen3-MoE: hf -> mg (EP 2, grouped) -> hf with the scripts, given only variables."""
    import torch
    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, norm_topk_prob=True)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    ok(run("ckpt_convert_qwen3_moe_hf_to_mg.sh", CKPT_LOAD_DIR=tmp_path / "hf", CKPT_SAVE_DIR=tmp_path / "mg", EP=2,
           LOG_DIR=tmp_path / "logs"))
    assert sorted(p.name for p in (tmp_path / "mg" / "iter_0000001").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    ok(run("ckpt_convert_qwen3_moe_mg_to_hf.sh", CKPT_LOAD_DIR=tmp_path / "mg", CKPT_SAVE_DIR=tmp_path / "back",
           LOG_DIR=tmp_path / "logs"))
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- tiny runs (QTRAIN_TINY=1: tiny-moe, 2 CPU processes)

import test_examples as _dense  # noqa: E402  (its data fixtures, shared here)

work, hf_tiny, pretrain_data, sft_data = _dense.work, _dense.hf_tiny, _dense.pretrain_data, _dense.sft_data


@pytest.fixture(scope="module")
def moe_pretrained(work, hf_tiny, pretrain_data):
    """The 30B-A3B pretrain example in tiny mode: EP 2 over its 2 processes, from random weights."""
    save = work / "ckpt" / "moe_pretrain"
    out = ok(run("pretrain_qwen3_30b_a3b_4k.sh", DATA_PATH=pretrain_data, TOKENIZER_PATH=hf_tiny, CKPT_SAVE_DIR=save,
                 LOG_DIR=work / "logs", TRAIN_ITERS=2))
    assert "iteration        2/       2" in out
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    return save


def test_tiny_pretrain_runs_with_expert_parallelism(moe_pretrained, work):
    log = (work / "logs" / "pretrain_qwen3_30b_a3b_4k.log").read_text()
    assert "--expert-model-parallel-size 2" in log and "--model-preset tiny-moe" in log and "lm loss" in log


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_tiny_sft_runs_from_the_pretrained_checkpoint(kind, moe_pretrained, hf_tiny, sft_data, work):
    save = work / "ckpt" / f"moe_sft_{kind}"
    out = ok(run(f"tune_qwen3_30b_a3b_4k_{kind}.sh", CKPT_LOAD_DIR=moe_pretrained, DATA_PATH=sft_data,
                 TOKENIZER_PATH=hf_tiny, CKPT_SAVE_DIR=save, LOG_DIR=work / "logs", TRAIN_ITERS=1))
    assert "iteration        1/       1" in out and (save / "latest_checkpointed_iteration.txt").is_file()
