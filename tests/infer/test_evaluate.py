"""qtrain evaluate: perplexity == exp(mean NLL) computed independently with transformers; MMLU/C-Eval
multiple-choice scoring against an independent log-likelihood computation."""

import csv
import json

import numpy as np
import pytest
import torch

from infer_helpers import save_tiny_hf
from qtrain.data.indexed import IndexedDatasetBuilder, bin_path, idx_path
from qtrain.infer.evaluate import main
from qtrain.infer.multiple_choice import read_csv
from tolerances import assert_close_scaled, qwen3_terms

transformers = pytest.importorskip("transformers")


def _hf(path):
    return transformers.Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _nll(hf, tokens):
    """Sum of -log p(token i | tokens < i) over i >= 1, by transformers."""
    with torch.no_grad():
        logp = hf(input_ids=torch.tensor([tokens])).logits[0].double().log_softmax(-1)
    return -float(logp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].sum()), len(tokens) - 1


@pytest.mark.parametrize("seq_length", [64, 7], ids=["whole", "windows"])
def test_perplexity_on_indexed_dataset(tmp_path, seq_length):
    save_tiny_hf(tmp_path / "m")
    rng = np.random.RandomState(0)
    seqs = [rng.randint(0, 211, size=n) for n in (30, 1, 17, 9, 40)]
    b = IndexedDatasetBuilder(bin_path(str(tmp_path / "d")), dtype=np.uint16)
    for s in seqs:
        b.add_item(s)
        b.end_document()
    b.finalize(idx_path(str(tmp_path / "d")))
    out = tmp_path / "ppl.json"
    assert main(["--load", str(tmp_path / "m"), "--data-path", str(tmp_path / "d"), "--seq-length", str(seq_length),
                 "--batch-size", "3", "--output-json", str(out)]) == 0
    got = json.loads(out.read_text())

    hf = _hf(tmp_path / "m")
    nll = count = 0
    for s in seqs:  # windows of seq_length targets, overlapping by one token
        for start in range(0, max(len(s) - 1, 0), seq_length):
            a, b_ = _nll(hf, s[start:start + seq_length + 1].tolist())
            nll, count = nll + a, count + b_
    assert got["tokens"] == count == sum(len(s) - 1 for s in seqs if len(s) > 1)
    # log perplexity = the mean NLL: the quantity summed
    assert_close_scaled(np.log(got["perplexity"]), nll / count, terms=qwen3_terms(hf.config, seq_length, tokens=count))


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory, tokenizer_dir):
    """(HF dir of a tiny model with the real Qwen3 vocabulary and tokenizer, transformers model, tokenizer)."""
    path = tmp_path_factory.mktemp("real") / "m"
    save_tiny_hf(path, vocab=151936, tokenizer_dir=tokenizer_dir, seed=3)
    return path, _hf(path), transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_perplexity_on_text_file(tmp_path, real_vocab, capsys):
    model_dir, hf, tok = real_vocab
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    (tmp_path / "t.txt").write_text(text)
    assert main(["--load", str(model_dir), "--text-file", str(tmp_path / "t.txt"),
                 "--output-json", str(tmp_path / "o.json")]) == 0
    got = json.loads((tmp_path / "o.json").read_text())
    nll, count = _nll(hf, tok(text).input_ids)
    assert got["tokens"] == count
    assert_close_scaled(np.log(got["perplexity"]), nll / count, terms=qwen3_terms(hf.config, count, tokens=count))
    assert "perplexity" in capsys.readouterr().out


QUESTIONS = [
    ("What is 2 + 2?", "3", "4", "5", "22"),
    ("Which planet is known as the red planet?", "Venus", "Mars", "Jupiter", "Saturn"),
    ("What is the boiling point of water at sea level?", "50 C", "90 C", "100 C", "120 C"),
    ("Which gas do plants absorb?", "Oxygen", "Nitrogen", "Carbon dioxide", "Helium"),
]
DEV = ("What colour is snow?", "Green", "White", "Red", "Blue", "B")


def _mmlu_prompt(subject, q, shots):
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    ex = f"{DEV[0]}\nA. {DEV[1]}\nB. {DEV[2]}\nC. {DEV[3]}\nD. {DEV[4]}\nAnswer: {DEV[5]}\n\n" if shots else ""
    return head + ex + f"{q[0]}\nA. {q[1]}\nB. {q[2]}\nC. {q[3]}\nD. {q[4]}\nAnswer:"


def _independent_scores(hf, tok, prompt, conts):
    """log P(continuation | prompt) by transformers, continuation tokenized on its own."""
    ctx = tok(prompt).input_ids
    out = []
    for c in conts:
        ids = tok(c).input_ids
        with torch.no_grad():
            logp = hf(input_ids=torch.tensor([ctx + ids])).logits[0].double().log_softmax(-1)
        out.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(ids))))
    return out


def _write(path, rows, header=None):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


@pytest.mark.parametrize("shots,score", [(0, "letter"), (1, "letter"), (0, "text")])
def test_multiple_choice_against_independent_loglikelihood(tmp_path, real_vocab, shots, score):
    model_dir, hf, tok = real_vocab
    best = []
    for q in QUESTIONS:
        conts = [" A", " B", " C", " D"] if score == "letter" else [" " + c for c in q[1:]]
        s = _independent_scores(hf, tok, _mmlu_prompt("high_school_science", q, shots), conts)
        assert len(set(s)) == 4  # no ties: the prediction is well defined
        best.append("ABCD"[int(np.argmax(s))])
    wrong = ["ABCD"[("ABCD".index(b) + 1) % 4] for b in best]
    data = tmp_path / "mmlu"
    (data / "dev").mkdir(parents=True)
    (data / "test").mkdir()
    for subject, answers in (("high_school_science", best), ("science_wrong", wrong)):
        _write(data / "dev" / f"{subject}_dev.csv", [DEV])
        _write(data / "test" / f"{subject}_test.csv", [(*q, a) for q, a in zip(QUESTIONS, answers)])
    out = tmp_path / "mc.json"
    assert main(["--load", str(model_dir), "--data-dir", str(data), "--shots", str(shots),
                 "--mc-score", score, "--output-json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["subjects"]["high_school_science"]["accuracy"] == 1.0
    assert got["subjects"]["high_school_science"]["predictions"] == best
    assert got["subjects"]["science_wrong"]["accuracy"] == 0.0
    assert got["accuracy"] == 0.5 and got["total"] == 8


def test_ceval_layout_and_bad_rows(tmp_path):
    _write(tmp_path / "law_val.csv", [(0, "问题", "甲", "乙", "丙", "丁", "C", "解析")],
           header=["id", "question", "A", "B", "C", "D", "answer", "explanation"])
    style, qs = read_csv(tmp_path / "law_val.csv")
    assert style == "ceval" and qs[0].answer == "C" and qs[0].choices == ["甲", "乙", "丙", "丁"]
    _write(tmp_path / "x_test.csv", [("q", "a", "b", "c", "d", "E")])
    with pytest.raises(Exception, match=r"x_test.csv:1: answer 'E'"):
        read_csv(tmp_path / "x_test.csv")


def test_perplexity_and_multiple_choice_in_one_run(tmp_path, real_vocab):
    model_dir, _, _ = real_vocab
    b = IndexedDatasetBuilder(bin_path(str(tmp_path / "d")), dtype=np.int32)
    b.add_item(np.arange(100, 120, dtype=np.int32))
    b.end_document()
    b.finalize(idx_path(str(tmp_path / "d")))
    (tmp_path / "mc").mkdir()
    _write(tmp_path / "mc" / "physics_test.csv", [(*QUESTIONS[0], "B")])
    out = tmp_path / "both.json"
    assert main(["--load", str(model_dir), "--data-path", str(tmp_path / "d"), "--data-dir", str(tmp_path / "mc"),
                 "--task", "ceval", "--output-json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["ppl"]["tokens"] == 19 and got["ceval"]["total"] == 1
    with pytest.raises(Exception, match="--task ppl needs"):
        main(["--load", str(model_dir), "--task", "ppl", "--data-dir", str(tmp_path / "mc")])
