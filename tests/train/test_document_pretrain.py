"""Pretraining with Megatron's document flags (--reset-attention-mask --reset-position-ids
--eod-mask-loss) on a preprocessed corpus: every document of a sample trains as if it were alone."""

import json

import pytest
import torch

from qtrain import cli
from qtrain.config import parse_args
from qtrain.errors import ConfigError
from qtrain.models.config import Qwen3Config
from qtrain.train.loop import pretrain
from tolerances import assert_close_scaled, qwen3_terms

SEQ = 64
CFG = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
FLAGS = ["--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss"]
TEXTS = ["To be, or not to be: that is the question.", "Fair is foul, and foul is fair.",
         "We are such stuff as dreams are made on.", "Out, out, brief candle!",
         "The rest is silence.", "What's done cannot be undone.", "Full fathom five thy father lies."] * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("docs")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert cli.main(["preprocess", "--input", str(root / "corpus.jsonl"), "--output-prefix", str(root / "c"),
                     "--tokenizer-name-or-path", str(tokenizer_dir), "--json-keys", "text", "--append-eod"]) == 0
    from qtrain.models.hf import save_hf
    from qtrain.models.qwen3 import build_model

    torch.manual_seed(3)
    model = build_model(CFG, "cpu")
    model.init_weights(std=0.1)
    save_hf(model, root / "hf")
    return root, model.eval()


def argv(root, tokenizer_dir, *extra):
    return ["--load", str(root / "hf"), "--data-path", str(root / "c_text_document"), "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
            "--split", "100,0,0", "--eval-iters", "0", "--tokenizer-name-or-path", str(tokenizer_dir), *extra]


def test_each_document_of_a_sample_trains_as_if_alone(setup, tokenizer_dir):
    from qtrain.data.blended import build_gpt_datasets
    from qtrain.data.gpt_dataset import GPTDatasetConfig
    from qtrain.data.tokenizer import Tokenizer

    root, model = setup
    eod = Tokenizer(tokenizer_dir, fast=False).eod
    ds = build_gpt_datasets([str(root / "c_text_document")], [2, 0, 0], GPTDatasetConfig(
        seq_length=SEQ, seed=1234, split="100,0,0", eod_token_id=eod, eod_mask_loss=True,
        reset_position_ids=True, reset_attention_mask=True))[0]
    total, count, docs_seen = torch.zeros((), dtype=torch.float64), 0, 0
    terms = qwen3_terms(CFG, SEQ, tokens=SEQ)
    for i in (0, 1):
        item = ds[i]
        bounds = sorted(set(item["cu_seqlens"].tolist()))
        with torch.no_grad():
            packed = model(item["input_ids"][None], position_ids=item["position_ids"][None],
                           cu_seqlens=item["cu_seqlens"][None], labels=item["labels"][None], loss_reduction="none")[0]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                alone = model(item["input_ids"][None, lo:hi], labels=item["labels"][None, lo:hi], loss_reduction="sum")
                assert_close_scaled(packed[lo:hi].sum(), alone, terms=terms, what=f"sample {i} document [{lo}, {hi})")
                total += alone.double()
        # eod-mask-loss: no loss where the input is EOD (its label, the next document's first token)
        assert (item["labels"][item["input_ids"] == eod] == -100).all()
        count += int((item["labels"] != -100).sum())
        docs_seen += len(bounds) - 1
    assert docs_seen > 4  # the samples really hold several documents each

    result = pretrain(parse_args(argv(root, tokenizer_dir, *FLAGS)), log=lambda *a, **k: None)
    assert_close_scaled(result.losses[1], total / count, terms=terms, what="the loop's first loss")
    # Without the flags the documents see each other: the loss differs (the check can fail).
    plain = pretrain(parse_args(argv(root, tokenizer_dir)), log=lambda *a, **k: None)
    assert abs(plain.losses[1] - float(total / count)) > 1e-3


def test_document_flags_need_the_tokenizers_eod(setup, tokenizer_dir):
    root, _ = setup
    no_tokenizer = [a for a in argv(root, tokenizer_dir, "--eod-mask-loss")
                    if a not in ("--tokenizer-name-or-path", str(tokenizer_dir))]
    with pytest.raises(ConfigError, match="--eod-mask-loss: documents end at the tokenizer's EOD token; give "
                                          "--tokenizer-name-or-path"):
        pretrain(parse_args(no_tokenizer), log=lambda *a, **k: None)
