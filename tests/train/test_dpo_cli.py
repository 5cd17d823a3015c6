"""`qtrain dpo` as users run it: MindSpeed-LLM's `qtrain sft --stage dpo` spelling, the metrics in the log line
and metrics.jsonl, an exact resume that keeps the recorded reference, LoRA, the dry-run plan with the
reference copy's memory, and every refusal by name (flags of another loss, a resume without a recorded
reference, a LoRA checkpoint as the reference, missing pair files)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qtrain.data.indexed import IndexedDatasetBuilder, bin_path, idx_path
from qtrain.data.pairwise_dataset import pairwise_prefixes
from qtrain.errors import ConfigError, DataError
from qtrain.models.config import Qwen3Config
from qtrain.models.hf import save_hf
from qtrain.models.qwen3 import Qwen3ForCausalLM
from qtrain.train.dpo import run_dpo

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 64, 32
QUIET = lambda *a: None  # noqa: E731


def _write(prefix, arrays):
    b = IndexedDatasetBuilder(bin_path(prefix), dtype=np.int32)
    for a in arrays:
        b.add_item(np.asarray(a, dtype=np.int32))
        b.end_document()
    b.finalize(idx_path(prefix))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(pairwise data prefix, a tiny HF model dir to start from)."""
    tmp = tmp_path_factory.mktemp("dpo_cli")
    rng = np.random.RandomState(0)
    pairs = []
    for _ in range(12):
        prompt = rng.randint(3, VOCAB, size=rng.randint(4, 9)).tolist()
        pairs.append((prompt, rng.randint(3, VOCAB, size=rng.randint(2, 8)).tolist() + [2],
                      rng.randint(3, VOCAB, size=rng.randint(2, 8)).tolist() + [2]))
    pre = pairwise_prefixes(str(tmp / "pairs"))
    for side, i in (("chosen", 1), ("rejected", 2)):
        _write(pre[f"{side}_input_ids"], [p[0] + p[i] for p in pairs])
        _write(pre[f"{side}_labels"], [[-100] * len(p[0]) + p[i] for p in pairs])
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.init_weights(std=0.1)
    save_hf(model, tmp / "base")
    return str(tmp / "pairs"), str(tmp / "base")


def _args(data, save, iters, *extra, load=None):
    return ["--data-path", data, "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--lr", "2e-3", "--lr-decay-style", "constant", "--log-interval", "1",
            "--eval-iters", "0", "--split", "100,0,0", "--save", str(save), "--device", "cpu", "--seed", "7",
            *(["--load", load] if load else []), *extra]


def test_sft_stage_dpo_runs_preference_training_with_the_metrics(setup, tmp_path, capsys):
    from qtrain.cli import main

    data, base = setup
    assert main(["sft", "--stage", "dpo", "--is-pairwise-dataset", "--dpo-beta", "0.2",
                 *_args(data, tmp_path / "ckpt", 2, load=base)]) == 0
    out = capsys.readouterr().out
    assert "preference loss: DPO sigmoid, beta 0.2" in out
    line = next(ln for ln in out.splitlines() if re.search(r"iteration\s+2/\s+2 \|", ln))
    for name in ("lm loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert f"| {name}: " in line, name
    records = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["loss"] - np.log(2)) < 1e-6 and records[0]["rewards/margins"] == 0  # policy = reference
    assert records[1]["rewards/margins"] != 0


def test_resume_takes_the_recorded_reference_and_continues_exactly(setup, tmp_path):
    data, base = setup
    whole = run_dpo(_args(data, tmp_path / "whole", 6, load=base), log=QUIET)
    run_dpo(_args(data, tmp_path / "part", 3, load=base), log=QUIET)
    state = json.loads((tmp_path / "part" / "iter_0000003" / "train_state.json").read_text())
    assert state["preference"]["ref_model"] == str(Path(base).resolve()) and state["preference"]["pref_loss"] == "dpo"
    # The same command again with more iterations, --load of the run's own checkpoint: the reference is the
    # recorded base model, not the resumed policy.
    resumed = run_dpo(_args(data, tmp_path / "part", 6, load=str(tmp_path / "part")), log=QUIET)
    assert list(resumed.losses) == [4, 5, 6]
    for it in (4, 5, 6):
        assert abs(resumed.losses[it] - whole.losses[it]) <= 1e-6 * abs(whole.losses[it]), (resumed.losses, whole.losses)


def test_lora_dpo_uses_the_adapters_off_reference(setup, tmp_path):
    data, base = setup
    result = run_dpo(_args(data, tmp_path / "lora", 3, "--lora-r", "4", "--lora-alpha", "8", load=base), log=QUIET)
    assert abs(result.losses[1] - np.log(2)) < 1e-6 and result.losses[3] < result.losses[1]
    assert (tmp_path / "lora" / "iter_0000003" / "adapter" / "adapter_config.json").is_file()
    state = json.loads((tmp_path / "lora" / "iter_0000003" / "train_state.json").read_text())
    assert state["preference"]["reference"] == "adapters off" and state["preference"]["ref_model"] is None
    with pytest.raises(ConfigError, match="LoRA run's checkpoint"):  # as a reference, its adapters would be lost
        run_dpo(_args(data, tmp_path / "x", 1, "--ref-model", str(tmp_path / "lora"), load=base), log=QUIET)


@pytest.mark.parametrize("extra,match", [
    (["--simpo-beta", "2"], "--simpo-beta: not options of --pref-loss dpo"),
    (["--pref-loss", "orpo", "--dpo-beta", "0.2"], "--dpo-beta: not options of --pref-loss orpo"),
    (["--pref-loss", "simpo", "--ref-model", "x"], "--ref-model: not options of --pref-loss simpo"),
    (["--stage", "simpo", "--pref-loss", "orpo"], "--stage simpo and --pref-loss orpo disagree"),
    (["--stage", "sft"], "--stage sft: qtrain dpo trains preference pairs"),
    (["--calculate-per-token-loss"], "--calculate-per-token-loss"),
    (["--dpo-loss-type", "hinge", "--dpo-label-smoothing", "0.1"], "label smoothing applies to the sigmoid loss"),
    (["--pref-loss", "simpo", "--simpo-gamma", "1", "--gamma-beta-ratio", "1"], "give one"),
])
def test_options_of_another_loss_are_refused_by_name(setup, tmp_path, extra, match):
    data, base = setup
    with pytest.raises(ConfigError, match=re.escape(match)):
        run_dpo(_args(data, tmp_path / "c", 1, *extra, load=base), log=QUIET)


def test_unknown_preference_flags_are_refused(setup, tmp_path):
    from qtrain.cli import main

    data, base = setup
    assert main(["dpo", *_args(data, tmp_path / "c", 1, "--precompute-ref-logps", load=base)]) == 2


def test_a_reference_is_required_and_resumes_need_a_recorded_one(setup, tmp_path):
    from qtrain.cli import main

    data, base = setup
    with pytest.raises(ConfigError, match="DPO needs a reference model"):
        run_dpo(_args(data, tmp_path / "a", 1), log=QUIET)
    # A qtrain checkpoint of a run that recorded no reference (here: an SFT run's, made by a SimPO run).
    run_dpo(_args(data, tmp_path / "simpo", 1, "--pref-loss", "simpo", load=base), log=QUIET)
    with pytest.raises(ConfigError, match="recorded no frozen DPO reference"):
        run_dpo(_args(data, tmp_path / "simpo", 2, load=str(tmp_path / "simpo")), log=QUIET)
    # ... which --finetune (a new run from those weights, also the reference) or --ref-model resolves.
    assert run_dpo(_args(data, tmp_path / "b", 1, "--finetune", load=str(tmp_path / "simpo")), log=QUIET).iteration == 1
    with pytest.raises(DataError, match="_packed_chosen_input_ids_document.bin/.idx not found"):
        run_dpo(_args(str(tmp_path / "nothing"), tmp_path / "d", 1, load=base), log=QUIET)
    assert main(["dpo", *_args(str(tmp_path / "nothing"), tmp_path / "e", 1, load=base)]) == 1


def test_dry_run_and_plan_count_pairs_and_the_reference_copy(capsys):
    from qtrain.cli import main
    from qtrain.config import parse_args
    from qtrain.models.presets import get_preset
    from qtrain.parallel.plan import estimate_memory

    flags = ["--model-preset", "1.7B", "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size", "64",
             "--train-iters", "100", "--bf16", "--use-distributed-optimizer", "--padded-vocab-size", "151936"]
    assert main(["dpo", *flags, "--dry-run", "--data-path", "x"]) == 0
    out = capsys.readouterr().out
    assert "qtrain dpo plan" in out and "reference: frozen copy" in out and "reference " in out
    cfg = parse_args(flags)
    model = get_preset("1.7B")
    plain = estimate_memory(model, cfg, 8)
    pairs = estimate_memory(model, cfg, 8, micro_batch_size=2, per_token_loss=True, reference_copy=True)
    assert pairs.reference == pytest.approx(2 * model.num_params / 8, rel=0.01)  # bf16 weights, sharded 8 ways
    assert pairs.activations > 2 * plain.activations * 0.99 and pairs.total > plain.total + pairs.reference
    assert main(["plan", *flags, "--world-size", "8", "--stage", "dpo"]) == 0
    assert "reference" in capsys.readouterr().out


def test_pack_pairs_trains_the_same_losses_and_is_refused_where_not_available(setup, tmp_path):
    """`--pack-pairs` end to end (the dataset's lengths, the loader, the loop): the losses of padded rows."""
    data, base = setup
    padded = run_dpo(_args(data, tmp_path / "padded", 3, load=base), log=QUIET)
    packed = run_dpo(_args(data, tmp_path / "packed", 3, "--pack-pairs", load=base), log=QUIET)
    for it, loss in padded.losses.items():
        assert abs(packed.losses[it] - loss) <= 1e-5 * max(1.0, abs(loss)), (packed.losses, padded.losses)
    with pytest.raises(ConfigError, match="--pack-pairs"):
        run_dpo(_args(data, tmp_path / "pp", 1, "--pack-pairs", "--pipeline-model-parallel-size", "2", load=base),
                log=QUIET)
