"""The scripts in examples/qwen3 as users run them: bash, variables only, QTRAIN_TINY=1 on CPU.

Three layers, cheapest first:
- QTRAIN_PRINT_ONLY=1 shows the command each per-size script builds: its defaults must be the
  published recipe's (table below, stated independently of examples/qwen3/common.sh).
- Every script runs end to end in tiny mode; distributed ones through torchrun with 2 gloo
  processes. Every pretrain, full-SFT and LoRA script trains and saves (the 1.7B ones a little
  longer, with a restart that resumes; the other sizes one iteration each).
- Conversion scripts round-trip the weights exactly; generate and evaluate read what was trained.
A command that is not written yet skips its tests, naming the missing module.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "qwen3"
ASSETS = ROOT / "qtrain" / "assets"
SIZES = ["0.6b", "1.7b", "4b", "8b", "14b", "32b"]

# MindSpeed-LLM examples/mcore/qwen3 (4K): (NPUS_PER_NODE, NNODES, TP, PP, MBS, GBS); the 8B-32B LoRA rows
# are qtrain's (LoRA trains data-parallel only: TP1 PP1 with full recompute, MindSpeed's MBS and GBS).
RECIPES = {
    ("0.6b", "pretrain"): (8, 1, 1, 1, 1, 64), ("0.6b", "full"): (8, 1, 1, 1, 1, 16),
    ("0.6b", "lora"): (8, 1, 1, 1, 1, 16),
    ("1.7b", "pretrain"): (8, 1, 1, 1, 1, 32), ("1.7b", "full"): (8, 1, 1, 1, 1, 32),
    ("1.7b", "lora"): (8, 1, 1, 1, 1, 16),
    ("4b", "pretrain"): (8, 1, 1, 1, 1, 64), ("4b", "full"): (8, 1, 1, 1, 1, 16),
    ("4b", "lora"): (8, 1, 1, 1, 1, 16),
    ("8b", "pretrain"): (8, 1, 1, 2, 1, 64), ("8b", "full"): (8, 1, 1, 2, 1, 16),
    ("8b", "lora"): (8, 1, 1, 1, 4, 16),
    ("14b", "pretrain"): (8, 1, 2, 4, 1, 128), ("14b", "full"): (8, 1, 8, 1, 1, 16),
    ("14b", "lora"): (8, 1, 1, 1, 4, 64),
    ("32b", "pretrain"): (8, 2, 8, 2, 1, 128), ("32b", "full"): (8, 2, 8, 2, 1, 16),
    ("32b", "lora"): (8, 1, 1, 1, 4, 16),
}
# Variables the scripts read: cleared so that a developer's shell cannot leak into a test.
VARIABLES = (
    "NPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT CKPT_LOAD_DIR CKPT_SAVE_DIR DATA_PATH "
    "TOKENIZER_PATH TP PP MBS GBS SEQ_LENGTH TRAIN_ITERS LR MIN_LR SAVE_INTERVAL LOG_INTERVAL LOG_DIR "
    "LOG_FILE DEVICE MODEL_SIZE INPUT OUTPUT_PREFIX JSON_KEYS WORKERS HANDLER_NAME PACK PROMPT "
    "MAX_NEW_TOKENS EVAL_DATA_PATH TASK LORA_R LORA_ALPHA LORA_TARGET_MODULES QTRAIN_TINY QTRAIN_PRINT_ONLY "
    "MAP_KEYS DPO_BETA DPO_LOSS_TYPE CP CP_ALGO ULYSSES_DEGREE"
).split()


def script_name(size: str, task: str) -> str:
    return f"pretrain_qwen3_{size}_4k.sh" if task == "pretrain" else f"tune_qwen3_{size}_4k_{task}.sh"


def needs(module: str) -> None:
    """Skip while the command a script calls is not written yet."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script: str, *args: str, **variables) -> subprocess.CompletedProcess:
    if not (EXAMPLES / script).is_file() and script == "pretrain_qwen3_1.7b_4k.sh":
        pytest.skip(f"examples/qwen3/{script} is not written yet (training engineer)")
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(QTRAIN_TINY="1", PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    env.update({k: str(v) for k, v in variables.items()})
    return subprocess.run(["bash", str(EXAMPLES / script), *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"exit {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}"
    return out.stdout


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def printed(script: str, **variables) -> list[str]:
    """The command a script would run (QTRAIN_PRINT_ONLY=1), as argv."""
    paths = dict(DATA_PATH="/data/enwiki_text_document", CKPT_SAVE_DIR="/nonexistent/save",
                 CKPT_LOAD_DIR="/model/qwen3", TOKENIZER_PATH="/model/qwen3")
    out = ok(run(script, QTRAIN_PRINT_ONLY=1, **{"QTRAIN_TINY": "0", **paths, **variables}))
    return out.strip().splitlines()[-1].split()


# ---------------------------------------------------------------- the commands scripts build


def test_every_size_has_every_entry_point():
    for (size, task) in RECIPES:
        if (size, task) == ("1.7b", "pretrain") and not (EXAMPLES / script_name(size, task)).is_file():
            continue  # written with the pretrain command; its own tests below skip until then
        assert (EXAMPLES / script_name(size, task)).is_file(), script_name(size, task)
    for name in ("data_convert_qwen3_pretrain.sh", "data_convert_qwen3_instruction.sh", "generate_qwen3.sh",
                 "evaluate_qwen3.sh", "ckpt_convert_qwen3_hf_to_mg.sh", "ckpt_convert_qwen3_mg_to_hf.sh",
                 "ckpt_convert_qwen3_hf_to_qtrain.sh", "ckpt_convert_qwen3_qtrain_to_hf.sh"):
        assert (EXAMPLES / name).is_file(), name


@pytest.mark.parametrize("size,task", sorted(RECIPES))
def test_defaults_are_the_published_recipe(size, task):
    command = printed(script_name(size, task))
    npus, nnodes, tp, pp, mbs, gbs = RECIPES[size, task]
    assert flag(command, "--nproc_per_node") == str(npus) and flag(command, "--nnodes") == str(nnodes)
    assert flag(command, "--tensor-model-parallel-size") == str(tp)
    assert flag(command, "--pipeline-model-parallel-size") == str(pp)
    assert flag(command, "--micro-batch-size") == str(mbs) and flag(command, "--global-batch-size") == str(gbs)
    assert flag(command, "--seq-length") == "4096" and flag(command, "--train-iters") == "2000"
    assert flag(command, "--model-preset").lower() == size and "--bf16" in command
    assert flag(command, "-m") == "torch.distributed.run" and command[command.index("qtrain") + 1] == (
        "pretrain" if task == "pretrain" else "sft")
    assert ("--lora-r" in command) == (task == "lora")
    big_lora = task == "lora" and size in ("8b", "14b", "32b")
    assert ("--recompute-granularity" in command) == big_lora


def test_variables_and_arguments_override_the_defaults():
    command = printed("pretrain_qwen3_8b_4k.sh", NPUS_PER_NODE=16, NNODES=4, NODE_RANK=3, MASTER_ADDR="10.0.0.1",
                      TP=4, PP=4, GBS=256, SEQ_LENGTH=8192, TRAIN_ITERS=10,
                      DATA_PATH="0.3 /data/a_text_document 0.7 /data/b_text_document")
    assert flag(command, "--nproc_per_node") == "16" and flag(command, "--nnodes") == "4"
    assert flag(command, "--node_rank") == "3" and flag(command, "--master_addr") == "10.0.0.1"
    assert flag(command, "--tensor-model-parallel-size") == "4" and flag(command, "--global-batch-size") == "256"
    assert flag(command, "--seq-length") == "8192" and flag(command, "--save-interval") == "10"
    i = command.index("--data-path")
    assert command[i + 1:i + 5] == ["0.3", "/data/a_text_document", "0.7", "/data/b_text_document"]
    extra = ok(run("pretrain_qwen3_8b_4k.sh", "--lr", "3e-4", QTRAIN_PRINT_ONLY=1, QTRAIN_TINY=0,
                   DATA_PATH="/d", CKPT_SAVE_DIR="/s")).split()
    assert extra[-2:] == ["--lr", "3e-4"]  # appended last: argparse lets the last one win


def test_tiny_mode_swaps_in_the_tiny_preset_on_two_cpu_processes():
    command = printed("pretrain_qwen3_32b_4k.sh", QTRAIN_TINY=1)
    assert flag(command, "--model-preset") == "tiny" and flag(command, "--device") == "cpu"
    assert flag(command, "--nproc_per_node") == "2" and flag(command, "--nnodes") == "1"
    assert flag(command, "--tensor-model-parallel-size") == "1" and flag(command, "--seq-length") == "64"
    assert "--bf16" not in command


def test_resume_comes_from_the_save_dir_when_it_holds_a_checkpoint(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")
    command = printed("tune_qwen3_4b_4k_full.sh", CKPT_SAVE_DIR=tmp_path)
    assert flag(command, "--load") == str(tmp_path) and "--finetune" not in command
    start = tmp_path / "start"
    start.mkdir()
    (start / "latest_checkpointed_iteration.txt").write_text("5")
    command = printed("tune_qwen3_4b_4k_full.sh", CKPT_LOAD_DIR=start, CKPT_SAVE_DIR=tmp_path / "new")
    assert flag(command, "--load") == str(start) and "--finetune" in command  # weights only
    command = printed("tune_qwen3_4b_4k_full.sh", CKPT_SAVE_DIR=tmp_path / "new")  # an HF dir: no --finetune
    assert flag(command, "--load") == "/model/qwen3" and "--finetune" not in command


def test_conversion_to_megatron_uses_the_sizes_layout():
    command = printed("ckpt_convert_qwen3_hf_to_mg.sh", MODEL_SIZE="14B")
    assert flag(command, "--target-tensor-parallel-size") == "2"
    assert flag(command, "--target-pipeline-parallel-size") == "4"
    assert flag(command, "--load-model-type") == "hf" and flag(command, "--save-model-type") == "mg"


def test_a_missing_variable_is_named():
    out = run("pretrain_qwen3_0.6b_4k.sh", QTRAIN_TINY=0, CKPT_SAVE_DIR="/s")
    assert out.returncode != 0 and "set DATA_PATH" in out.stderr
    out = run("ckpt_convert_qwen3_hf_to_mg.sh", QTRAIN_PRINT_ONLY=1, MODEL_SIZE="3B", CKPT_LOAD_DIR="/m",
              CKPT_SAVE_DIR="/s")
    assert out.returncode != 0 and "MODEL_SIZE=3B" in out.stderr and "0.6B 1.7B 4B 8B 14B 32B" in out.stderr


# ---------------------------------------------------------------- end to end, tiny, on CPU


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="module")
def hf_tiny(work, tokenizer_dir) -> Path:
    """A tiny Qwen3 saved as an HF model dir, with the real tokenizer: the users' CKPT_LOAD_DIR."""
    from qtrain.models.hf import save_hf
    from qtrain.models.presets import get_preset
    from qtrain.models.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(get_preset("tiny"))
    model.init_weights()
    save_hf(model, work / "hf_tiny", tokenizer_dir=tokenizer_dir)
    return work / "hf_tiny"


def head(asset: str, lines: int, out: Path) -> Path:
    with open(ASSETS / asset, encoding="utf-8") as f:
        out.write_text("".join(itertools.islice(f, lines)), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def pretrain_data(work, hf_tiny) -> str:
    needs("qtrain.data.preprocess")
    corpus = head("sample_corpus.jsonl", 12, work / "corpus.jsonl")
    ok(run("data_convert_qwen3_pretrain.sh", INPUT=corpus, TOKENIZER_PATH=hf_tiny,
           OUTPUT_PREFIX=work / "dataset" / "shakespeare", LOG_DIR=work / "logs"))
    return str(work / "dataset" / "shakespeare_text_document")


@pytest.fixture(scope="module")
def sft_data(work, hf_tiny) -> str:
    needs("qtrain.data.preprocess")
    alpaca = head("sample_alpaca.jsonl", 48, work / "alpaca.jsonl")
    ok(run("data_convert_qwen3_instruction.sh", INPUT=alpaca, TOKENIZER_PATH=hf_tiny,
           OUTPUT_PREFIX=work / "dataset" / "alpaca", LOG_DIR=work / "logs"))
    return str(work / "dataset" / "alpaca")


@pytest.fixture(scope="module")
def pretrained(work, hf_tiny, pretrain_data) -> Path:
    """The 1.7B pretrain example, given only the variables: 2 iterations from the HF dir."""
    needs("qtrain.train.pretrain")
    save, logs = work / "ckpt" / "pretrain", work / "logs" / "not" / "there" / "yet"
    out = ok(run("pretrain_qwen3_1.7b_4k.sh", CKPT_LOAD_DIR=hf_tiny, DATA_PATH=pretrain_data,
                 TOKENIZER_PATH=hf_tiny, CKPT_SAVE_DIR=save, LOG_DIR=logs, TRAIN_ITERS=2))
    assert re.search(r"iteration\s+2/\s*2 \|", out), out[-3000:]
    log = (logs / "pretrain_qwen3_1.7b_4k.log").read_text()
    assert re.search(r"iteration\s+1/\s*2 \|.*lm loss", log) and "pretrain" in log.splitlines()[1]
    return save


def test_data_convert_pretrain_tokenizes_each_document_with_eod(pretrain_data, hf_tiny):
    from transformers import AutoTokenizer

    from qtrain.data.indexed import IndexedDataset

    tok = AutoTokenizer.from_pretrained(hf_tiny)
    data = IndexedDataset(pretrain_data)
    with open(ASSETS / "sample_corpus.jsonl", encoding="utf-8") as f:
        import json

        first = json.loads(f.readline())["text"]
    assert len(data) == 12
    assert data[0].tolist() == tok(first)["input_ids"] + [tok.eos_token_id]


def test_data_convert_instruction_writes_the_sft_dataset(sft_data):
    for part in ("input_ids", "labels"):
        assert Path(f"{sft_data}_packed_{part}_document.idx").is_file()


def test_pretrain_1p7b_runs_from_variables_and_a_restart_resumes(pretrained, hf_tiny, pretrain_data, work):
    assert (pretrained / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # The same job started again with more iterations (a platform restart): it resumes at 3.
    out = ok(run("pretrain_qwen3_1.7b_4k.sh", CKPT_LOAD_DIR=hf_tiny, DATA_PATH=pretrain_data,
                 TOKENIZER_PATH=hf_tiny, CKPT_SAVE_DIR=pretrained, LOG_DIR=work / "logs", TRAIN_ITERS=3))
    assert "resuming from" in out and re.search(r"iteration\s+3/\s*3 \|", out)
    assert not re.search(r"iteration\s+1/\s*3 \|", out)
    assert (pretrained / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_a_stopped_job_saves_a_checkpoint(hf_tiny, pretrain_data, work):
    """A platform stops a job with SIGTERM to the script (often PID 1): the run saves, then ends."""
    needs("qtrain.train.pretrain")
    save, logs = work / "ckpt" / "stopped", work / "logs"
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(QTRAIN_TINY="1", PYTHON=sys.executable, MASTER_PORT=str(free_port()), CKPT_LOAD_DIR=str(hf_tiny),
               DATA_PATH=pretrain_data, CKPT_SAVE_DIR=str(save), LOG_DIR=str(logs), TRAIN_ITERS="1000",
               SAVE_INTERVAL="1000")
    proc = subprocess.Popen(["bash", str(EXAMPLES / "pretrain_qwen3_0.6b_4k.sh")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seen = []
    for line in proc.stdout:  # wait for the first trained iteration
        seen.append(line)
        if re.search(r"iteration\s+1/\s*1000 \|", line):
            break
    proc.send_signal(15)
    seen += proc.stdout.readlines()
    proc.wait(timeout=300)
    tracker = save / "latest_checkpointed_iteration.txt"
    assert tracker.is_file(), "".join(seen)[-4000:]
    iteration = int(tracker.read_text())
    assert 1 <= iteration < 1000 and (save / f"iter_{iteration:07d}").is_dir()
    assert "stop requested" in "".join(seen)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sft_1p7b_trains_and_saves(kind, hf_tiny, sft_data, work):
    needs("qtrain.train.sft")
    save = work / "ckpt" / f"sft_{kind}"
    out = ok(run(f"tune_qwen3_1.7b_4k_{kind}.sh", CKPT_LOAD_DIR=hf_tiny, DATA_PATH=sft_data,
                 TOKENIZER_PATH=hf_tiny, CKPT_SAVE_DIR=save, LOG_DIR=work / "logs", TRAIN_ITERS=2))
    assert re.search(r"iteration\s+2/\s*2 \|", out), out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


OTHER_SIZES = [(s, t) for (s, t) in sorted(RECIPES) if s != "1.7b"]


@pytest.mark.parametrize("size,task", OTHER_SIZES)
def test_other_sizes_run_through_torchrun(size, task, hf_tiny, pretrain_data, sft_data, work):
    needs("qtrain.train.pretrain" if task == "pretrain" else "qtrain.train.sft")
    data = pretrain_data if task == "pretrain" else sft_data
    save = work / "ckpt" / f"{size}_{task}"
    out = ok(run(script_name(size, task), CKPT_LOAD_DIR=hf_tiny, DATA_PATH=data, TOKENIZER_PATH=hf_tiny,
                 CKPT_SAVE_DIR=save, LOG_DIR=work / "logs", TRAIN_ITERS=1))
    assert re.search(r"iteration\s+1/\s*1 \|", out), out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from qtrain.models.hf import iter_safetensors

    return dict(iter_safetensors(folder))


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_safetensors(a), load_safetensors(b)
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert tensor.dtype == right[name].dtype and torch.equal(tensor, right[name]), name


def test_checkpoint_conversion_scripts_round_trip_exactly(hf_tiny, work):
    needs("qtrain.checkpoint.convert")
    mg, back = work / "convert" / "mg", work / "convert" / "hf_from_mg"
    ok(run("ckpt_convert_qwen3_hf_to_mg.sh", CKPT_LOAD_DIR=hf_tiny, CKPT_SAVE_DIR=mg, TP=2, PP=2,
           LOG_DIR=work / "logs"))
    assert (mg / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    ok(run("ckpt_convert_qwen3_mg_to_hf.sh", CKPT_LOAD_DIR=mg, CKPT_SAVE_DIR=back, LOG_DIR=work / "logs"))
    assert_same_weights(hf_tiny, back)
    qt, back = work / "convert" / "qtrain", work / "convert" / "hf_from_qtrain"
    ok(run("ckpt_convert_qwen3_hf_to_qtrain.sh", CKPT_LOAD_DIR=hf_tiny, CKPT_SAVE_DIR=qt, LOG_DIR=work / "logs"))
    ok(run("ckpt_convert_qwen3_qtrain_to_hf.sh", CKPT_LOAD_DIR=qt, CKPT_SAVE_DIR=back, LOG_DIR=work / "logs"))
    assert_same_weights(hf_tiny, back)


def test_generate_answers_a_prompt(hf_tiny, work):
    needs("qtrain.infer.generate")
    out = ok(run("generate_qwen3.sh", "--greedy", CKPT_LOAD_DIR=hf_tiny, TOKENIZER_PATH=hf_tiny,
                 PROMPT="To be, or not to be", MAX_NEW_TOKENS=8, LOG_DIR=work / "logs"))
    log = (work / "logs" / "generate_qwen3.log").read_text()
    assert "To be, or not to be" in log and out.strip()


def test_evaluate_measures_perplexity_of_the_trained_checkpoint(pretrained, hf_tiny, pretrain_data, work):
    needs("qtrain.infer.evaluate")
    out = ok(run("evaluate_qwen3.sh", "--max-sequences", "8", CKPT_LOAD_DIR=pretrained, TOKENIZER_PATH=hf_tiny, DATA_PATH=pretrain_data,
                 LOG_DIR=work / "logs"))
    assert re.search(r"perplexity", out, re.I), out[-3000:]


def test_evaluate_scores_an_mmlu_format_directory(hf_tiny, work):
    needs("qtrain.infer.evaluate")
    mmlu = work / "mmlu"
    mmlu.mkdir(exist_ok=True)
    (mmlu / "arithmetic_test.csv").write_text("What is 2 + 2?,3,4,5,6,B\nWhat is 3 x 3?,6,8,9,12,C\n")
    out = ok(run("evaluate_qwen3.sh", CKPT_LOAD_DIR=hf_tiny, EVAL_DATA_PATH=mmlu, TASK="mmlu", LOG_DIR=work / "logs"))
    assert "arithmetic" in out, out[-3000:]


# ---------------------------------------------------------------- preference training (qtrain dpo)

# qtrain's DPO layouts (MindSpeed-LLM publishes a Qwen3 DPO script for the 30B-A3B MoE only; its MBS/GBS):
# (NPUS_PER_NODE, TP, PP, MBS, GBS, LR, full recompute)
DPO_RECIPES = {("1.7b", "full"): (8, 1, 1, 1, 32, "5e-7", False), ("1.7b", "lora"): (8, 1, 1, 1, 32, "5e-6", False),
               ("8b", "full"): (8, 1, 2, 1, 32, "5e-7", True), ("8b", "lora"): (8, 1, 1, 1, 32, "5e-6", True)}


@pytest.mark.parametrize("size,kind", sorted(DPO_RECIPES))
def test_dpo_scripts_build_the_recipe(size, kind):
    command = printed(f"dpo_qwen3_{size}_4k_{kind}.sh", DATA_PATH="/data/pairs")
    npus, tp, pp, mbs, gbs, lr, recompute = DPO_RECIPES[size, kind]
    assert command[command.index("qtrain") + 1] == "dpo" and flag(command, "--nproc_per_node") == str(npus)
    assert flag(command, "--tensor-model-parallel-size") == str(tp)
    assert flag(command, "--pipeline-model-parallel-size") == str(pp)
    assert flag(command, "--micro-batch-size") == str(mbs) and flag(command, "--global-batch-size") == str(gbs)
    assert flag(command, "--lr") == lr and flag(command, "--dpo-beta") == "0.1"
    assert flag(command, "--dpo-loss-type") == "sigmoid" and "--use-distributed-optimizer" in command
    assert flag(command, "--load") == "/model/qwen3" and flag(command, "--model-preset").lower() == size
    assert ("--lora-r" in command) == (kind == "lora")
    assert (flag(command, "--recompute-granularity") == "full") if recompute else "--recompute-granularity" not in command
    convert = printed("data_convert_qwen3_pairwise.sh", INPUT="/d/pairs.jsonl", OUTPUT_PREFIX="/d/pairs",
                      MAP_KEYS='{"system": "system"}')
    assert flag(convert, "--handler-name") == "AlpacaStylePairwiseHandler" and flag(convert, "--seq-length") == "4096"
    assert "--map-keys" in convert


@pytest.fixture(scope="module")
def pairwise_data(work, hf_tiny) -> str:
    needs("qtrain.data.preprocess")
    pairs = head("sample_preference.jsonl", 48, work / "pairs.jsonl")
    ok(run("data_convert_qwen3_pairwise.sh", INPUT=pairs, TOKENIZER_PATH=hf_tiny, OUTPUT_PREFIX=work / "dataset" / "pairs",
           LOG_DIR=work / "logs", MAP_KEYS='{"system": "system", "history": "history"}'))
    return str(work / "dataset" / "pairs")


@pytest.mark.parametrize("size,kind", sorted(DPO_RECIPES))
def test_dpo_scripts_train_and_save(size, kind, hf_tiny, pairwise_data, work):
    needs("qtrain.train.dpo")
    save, iters = work / "ckpt" / f"dpo_{size}_{kind}", 2 if size == "1.7b" else 1
    out = ok(run(f"dpo_qwen3_{size}_4k_{kind}.sh", CKPT_LOAD_DIR=hf_tiny, DATA_PATH=pairwise_data, TOKENIZER_PATH=hf_tiny,
                 CKPT_SAVE_DIR=save, LOG_DIR=work / "logs", TRAIN_ITERS=iters))
    line = re.search(rf"iteration\s+{iters}/\s*{iters} \|.*", out)
    assert line and "rewards/accuracies" in line.group(0), out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)


# ---------------------------------------------------------------- several nodes


def test_slurm_script_gives_each_node_its_rank_and_the_master(tmp_path):
    """The sbatch script under stand-ins for scontrol and srun (two nodes, run one after the other)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(  # drop srun's options, run the command once per node
        '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\n'
        'for id in 0 1; do SLURM_NODEID=$id "$@" || exit; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = ok(run("../slurm/qwen3_pretrain.sbatch", QTRAIN_PRINT_ONLY=1, QTRAIN_TINY=0, QTRAIN_DIR=ROOT,
                 SLURM_JOB_NUM_NODES=2, SLURM_JOB_NODELIST="node-[a-b]", MASTER_PORT=29400,
                 PATH=f"{bin_dir}:{os.environ['PATH']}"))
    commands = [line.split() for line in out.strip().splitlines()]
    assert [flag(c, "--node_rank") for c in commands] == ["0", "1"]
    for c in commands:
        assert flag(c, "--nnodes") == "2" and flag(c, "--master_addr") == "node-a"
        assert flag(c, "--master_port") == "29400" and flag(c, "--tensor-model-parallel-size") == "8"


def test_pytorchjob_manifest_runs_an_example_on_every_pod():
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((ROOT / "examples" / "k8s" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(spec["replicas"] for spec in replicas.values())
    for role in ("Master", "Worker"):
        (container,) = replicas[role]["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NNODES"] == str(nodes) and set(env) <= set(VARIABLES)
        command = " ".join(container["command"] + container["args"])
        script = re.search(r"/opt/qtrain/(examples/qwen3/\S+\.sh)", command).group(1)
        assert (ROOT / script).is_file() and 'NODE_RANK="$RANK"' in command
        assert any(p["name"] == "pytorchjob-port" for p in container["ports"])


# ---------------------------------------------------------------- long sequences (context parallel)

LONG = {"pretrain_qwen3_1.7b_32k.sh": ("1.7b", 32768, 4), "pretrain_qwen3_8b_128k.sh": ("8b", 131072, 8)}
DOCUMENT_FLAGS = ("--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss")


@pytest.mark.parametrize("script", sorted(LONG))
def test_long_sequence_examples_build_their_layout(script):
    size, seq, cp = LONG[script]
    command = printed(script)
    assert flag(command, "--model-preset").lower() == size and flag(command, "--seq-length") == str(seq)
    assert flag(command, "--context-parallel-size") == str(cp) and flag(command, "--nproc_per_node") == "8"
    assert flag(command, "--context-parallel-algo") == "megatron_cp_algo"
    assert all(f in command for f in DOCUMENT_FLAGS)
    if size == "8b":
        assert flag(command, "--rope-scaling-type") == "yarn" and flag(command, "--rope-scaling-factor") == "4"
        assert flag(command, "--rope-scaling-original-max-position-embeddings") == "32768"
        assert flag(command, "--pipeline-model-parallel-size") == "1"
    command = printed(script, CP_ALGO="hybrid_cp_algo", ULYSSES_DEGREE=2)
    assert flag(command, "--context-parallel-algo") == "hybrid_cp_algo" and flag(command, "--ulysses-degree-in-cp") == "2"


def test_1p7b_32k_example_dry_run_and_plan_on_8_devices():
    """The 1.7B example's own qtrain arguments (seq 32,768): the dry run and `qtrain plan` on 8 devices."""
    command = printed("pretrain_qwen3_1.7b_32k.sh", TOKENIZER_PATH="")
    args = command[command.index("pretrain") + 1:]
    env = {**os.environ, "WORLD_SIZE": "8", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "qtrain", "pretrain", *args, "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 8 = TP 1 x PP 1 x CP 4 x DP 2" in out.stdout and "seq 32768" in out.stdout
    assert "CP 4 megatron_cp_algo" in out.stdout and "--reset-attention-mask" in out.stdout
    out = subprocess.run([sys.executable, "-m", "qtrain", "plan", *args, "--world-size", "8",
                          "--device-memory-gb", "64"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cp4 on 8 devices, seq 32768" in out.stdout and "fits in 64 GB per device" in out.stdout


@pytest.mark.parametrize("script", sorted(LONG))
def test_long_sequence_examples_train_in_tiny_mode(script, hf_tiny, pretrain_data, work):
    """Tiny mode: 2 CPU processes as CP 2 (ring), documents split at EOD, one iteration saved."""
    needs("qtrain.train.pretrain")
    save = work / "ckpt" / script
    out = ok(run(script, CKPT_LOAD_DIR=hf_tiny, DATA_PATH=pretrain_data, TOKENIZER_PATH=hf_tiny,
                 CKPT_SAVE_DIR=save, LOG_DIR=work / "logs", TRAIN_ITERS=1))
    assert re.search(r"iteration\s+1/\s*1 \|", out), out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
