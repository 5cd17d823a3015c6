"""A real training signal: 30 iterations of `qtrain dpo` from a `qtrain sft` checkpoint, on real preference
pairs (qtrain/assets/sample_preference.jsonl: computed answers chosen, plausible wrong ones rejected, made
into datasets by `qtrain preprocess --handler-name AlpacaStylePairwiseHandler` with the real Qwen3
tokenizer), raise the reward accuracy on the training pairs above 0.5 and the mean reward margin above 0
(both are 0 before: the policy starts as the reference).

To run in seconds on CPU the model is tiny and its vocabulary is the pairs' own: the 200-odd token ids the
data uses are renumbered 0..K-1 (the same map for every sequence, so the pairs are unchanged but for the
names of their tokens).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qtrain.assets import SAMPLE_PREFERENCE
from qtrain.data.indexed import IndexedDataset, IndexedDatasetBuilder, bin_path, idx_path
from qtrain.data.instruction_dataset import dataset_prefixes
from qtrain.data.pairwise_dataset import pairwise_prefixes

ASSET = SAMPLE_PREFERENCE
PAIRS, SEQ, BETA = 48, 96, 0.1

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(prefix: str, arrays) -> None:
    b = IndexedDatasetBuilder(bin_path(prefix), dtype=np.int32)
    for a in arrays:
        b.add_item(np.asarray(a, dtype=np.int32))
        b.end_document()
    b.finalize(idx_path(prefix))


def _compact(real: str, out: Path) -> tuple[str, str, int]:
    """(pairwise prefix, SFT prefix of the chosen answers, vocabulary) with renumbered token ids."""
    src = {k: IndexedDataset(p) for k, p in pairwise_prefixes(real).items()}
    n = len(src["chosen_input_ids"])
    used = sorted({int(t) for k in ("chosen_input_ids", "rejected_input_ids") for i in range(n) for t in src[k][i]})
    lut = {t: i + 1 for i, t in enumerate(used)}  # 0 stays the pad id

    def remap(a):
        return [lut[int(t)] if t != -100 else -100 for t in a]

    pairs = pairwise_prefixes(str(out / "pairs"))
    for key, prefix in pairs.items():
        _write(prefix, [remap(src[key][i]) for i in range(n)])
    sft = dataset_prefixes(str(out / "sft"))
    _write(sft["input_ids"], [remap(src["chosen_input_ids"][i]) for i in range(n)])
    _write(sft["labels"], [remap(src["chosen_labels"][i]) for i in range(n)])
    _write(sft["attention_mask"], [[1] * len(src["chosen_input_ids"][i]) for i in range(n)])
    return str(out / "pairs"), str(out / "sft"), len(used) + 1


def _model_args(vocab: int) -> list[str]:
    return ["--padded-vocab-size", str(vocab), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--group-query-attention", "--kv-channels", "16",
            "--max-position-embeddings", str(SEQ), "--seq-length", str(SEQ), "--device", "cpu", "--seed", "3",
            "--split", "100,0,0", "--eval-iters", "0", "--lr-decay-style", "constant", "--weight-decay", "0",
            "--log-interval", "10"]


def _rewards(policy_dir: Path, ref_dir: Path, pairs: str) -> tuple[float, float]:
    """(reward accuracy, mean reward margin) of the policy against the reference on every pair."""
    from qtrain.data.pairwise_dataset import PairwiseDataset
    from qtrain.infer.loading import load_model_for_inference
    from qtrain.train.preference import pair_rows

    ds = PairwiseDataset(pairs, SEQ, 0, shuffle=False)
    rows = pair_rows({k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("input_ids", "labels")})
    logps = []
    for folder in (policy_dir, ref_dir):
        model, _ = load_model_for_inference(folder)
        with torch.no_grad():
            logps.append(-model(rows["input_ids"], labels=rows["labels"], loss_reduction="none").sum(-1))
    reward = BETA * (logps[0] - logps[1])
    chosen, rejected = reward.chunk(2)
    return float((chosen > rejected).float().mean()), float((chosen - rejected).mean())


@pytest.mark.timeout(300)
def test_dpo_from_an_sft_checkpoint_learns_the_preferences(tmp_path, tokenizer_dir):
    from qtrain.data.preprocess import main as preprocess
    from qtrain.train.dpo import run_dpo
    from qtrain.train.sft import run_sft

    records = tmp_path / "pairs.jsonl"
    records.write_text("".join(ASSET.read_text(encoding="utf-8").splitlines(keepends=True)[:PAIRS]), encoding="utf-8")
    assert json.loads(records.read_text().splitlines()[0])["rejected"]
    assert preprocess(["--input", str(records), "--handler-name", "AlpacaStylePairwiseHandler", "--prompt-type",
                       "qwen3", "--tokenizer-name-or-path", str(tokenizer_dir), "--output-prefix",
                       str(tmp_path / "real"), "--seq-length", str(SEQ), "--workers", "1",
                       "--map-keys", '{"system": "system", "history": "history"}']) == 0
    pairs, sft_data, vocab = _compact(str(tmp_path / "real"), tmp_path)

    quiet = lambda *a: None  # noqa: E731
    sft = tmp_path / "sft"
    run_sft(_model_args(vocab) + ["--data-path", sft_data, "--micro-batch-size", "8", "--global-batch-size", "8",
                                  "--train-iters", "40", "--lr", "3e-3", "--init-method-std", "0.05",
                                  "--save", str(sft)], log=quiet)
    dpo = tmp_path / "dpo"
    result = run_dpo(_model_args(vocab) + ["--data-path", pairs, "--load", str(sft), "--finetune",
                                           "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters",
                                           "30", "--lr", "1e-3", "--dpo-beta", str(BETA), "--save", str(dpo)],
                     log=quiet)
    assert result.iteration == 30
    metrics = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["rewards/margins"] > -1e-6  # logged: the first step's rewards are ~0 (policy = reference)
    accuracy, margin = _rewards(dpo, sft, pairs)
    print(f"reward accuracy {accuracy:.3f}, margin {margin:.4f}; logged {metrics[-1]}")
    assert accuracy > 0.5 and margin > 0, (accuracy, margin)
    before, _ = _rewards(sft, sft, pairs)
    assert before == 0  # the same model: every reward is 0, no pair is ranked right
