"""Multiple-choice accuracy on MMLU / C-Eval style CSV files, scored by log-likelihood.

Files (searched recursively under a directory): `<subject>_dev.csv` holds the k-shot examples,
`<subject>_test.csv` (or `_val.csv`) the questions. Two layouts, detected per file:

- MMLU: no header; rows `question,A,B,C,D,answer`;
- C-Eval: header `id,question,A,B,C,D,answer[,explanation]`.

The prompt is the classic one of each benchmark (a subject line, k solved dev examples, then the
question ending in "Answer:" / "答案："). The predicted choice is the one whose continuation has
the highest log-likelihood after the prompt: the letter (" A", ...) by default, or the choice
text (summed log-probability of its tokens) with score="text".
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qtrain.errors import DataError
from qtrain.models.qwen3 import Qwen3ForCausalLM

LETTERS = ("A", "B", "C", "D")
CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer"]


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: str  # "A".."D", or "" when the file has no answers (C-Eval test)


@dataclass
class Subject:
    name: str
    style: str  # "mmlu" or "ceval"
    dev: list[Question] = field(default_factory=list)
    eval: list[Question] = field(default_factory=list)


def read_csv(path: Path) -> tuple[str, list[Question]]:
    """(style, questions) of one file; errors name the file and row."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return "mmlu", []
    head = [c.strip() for c in rows[0]]
    style = "ceval" if head[:7] == CEVAL_HEADER else "mmlu"
    body = rows[1:] if style == "ceval" else rows
    first = 1 if style == "ceval" else 0
    out = []
    width = len(head) if style == "ceval" else 6
    for n, row in enumerate(body, start=first + 1):
        fields = row[1:7] if style == "ceval" else row[:6]
        if len(row) != width:  # a field too many is as wrong as one too few: the columns would shift
            layout = (f"the {width} columns of its header ({','.join(head)})" if style == "ceval"
                      else "6 fields: question, A, B, C, D, answer (MMLU layout, no header)")
            raise DataError(f"{path}:{n}: expected {layout}, got {len(row)} fields; quote a field that "
                            f"holds a comma")
        answer = fields[5].strip().upper()
        if answer and answer not in LETTERS:
            raise DataError(f"{path}:{n}: answer {fields[5]!r} is not one of A, B, C, D")
        out.append(Question(fields[0], list(fields[1:5]), answer))
    return style, out


def load_subjects(data_dir: str | Path, split: str = "test", subjects: list[str] | None = None) -> list[Subject]:
    """Subjects with `<name>_<split>.csv` under data_dir (and their `<name>_dev.csv` when present)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: not a directory")
    pattern = re.compile(rf"^(.+)_{split}\.csv$")
    found: dict[str, Subject] = {}
    dev_files = {p.name[: -len("_dev.csv")]: p for p in root.rglob("*_dev.csv")}
    for path in sorted(root.rglob(f"*_{split}.csv")):
        name = pattern.match(path.name).group(1)
        if subjects and name not in subjects:
            continue
        style, questions = read_csv(path)
        subject = Subject(name, style, eval=questions)
        if name in dev_files:
            subject.dev = read_csv(dev_files[name])[1]
        found[name] = subject
    if not found:
        want = f" among {subjects}" if subjects else ""
        raise DataError(f"--data-dir {root}: no *_{split}.csv files{want} (MMLU/C-Eval layout: "
                        f"<subject>_dev.csv and <subject>_{split}.csv)")
    return list(found.values())


def _format(q: Question, style: str, with_answer: bool) -> str:
    cue = "答案：" if style == "ceval" else "Answer:"
    lines = [q.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices)]
    text = "\n".join(lines) + f"\n{cue}"
    if with_answer:
        text += f"{'' if style == 'ceval' else ' '}{q.answer}\n\n"
    return text


def build_prompt(subject: Subject, q: Question, shots: int) -> str:
    """The benchmark's prompt: subject line, `shots` solved dev examples, the question."""
    topic = subject.name.replace("_", " ")
    if subject.style == "ceval":
        head = f"以下是中国关于{topic}考试的单项选择题，请选出其中的正确答案。\n\n"
    else:
        head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    examples = "".join(_format(d, subject.style, True) for d in subject.dev[:shots])
    return head + examples + _format(q, subject.style, False)


def continuations(q: Question, style: str, score: str) -> list[str]:
    """The text scored after the prompt for each choice."""
    sep = "" if style == "ceval" else " "
    return [f"{sep}{letter}" for letter in LETTERS] if score == "letter" else [f"{sep}{t}" for t in q.choices]


@torch.no_grad()
def continuation_logprobs(model: Qwen3ForCausalLM, context: list[int], conts: list[list[int]],
                          device: torch.device | str = "cpu") -> list[float]:
    """log P(cont | context) for each continuation: one forward when every continuation is one token,
    else one right-padded batch of context + continuation."""
    if all(len(c) == 1 for c in conts):
        logits = model(torch.tensor([context], device=device))[0, -1].float()
        logp = logits.log_softmax(-1)
        return [float(logp[c[0]]) for c in conts]
    seqs = [context + c for c in conts]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    logp = model(ids.to(device)).float().log_softmax(-1)
    out = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(context) - 1, len(context) - 1 + len(c), device=logp.device)
        out.append(float(logp[i, pos, torch.tensor(c, device=logp.device)].sum()))
    return out


@dataclass
class SubjectResult:
    name: str
    correct: int
    total: int
    predictions: list[str]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def evaluate_subject(model: Qwen3ForCausalLM, tokenizer, subject: Subject, shots: int = 0, score: str = "letter",
                     max_length: int = 4096, device: torch.device | str = "cpu") -> SubjectResult:
    """Accuracy on one subject; a prompt too long for `max_length` drops dev examples until it fits."""
    from qtrain.infer import limits

    correct = total = 0
    preds = []
    for n, q in enumerate(subject.eval, 1):
        k = min(shots, len(subject.dev))
        while True:
            context = tokenizer(build_prompt(subject, q, k)).input_ids
            if len(context) + 64 <= max_length or k == 0:
                break
            k -= 1
        conts = [tokenizer(c).input_ids for c in continuations(q, subject.style, score)]
        where = f"subject {subject.name}, question {n}"
        limits.check_ids(context + [i for c in conts for i in c], model.config.vocab_size, where,
                         limits.tokenizer_fix(tokenizer))
        limits.check_length(len(context) + max(map(len, conts)), model.config.max_position_embeddings, where,
                            "the question alone is longer than the model takes; leave that subject out with --subjects")
        scores = continuation_logprobs(model, context, conts, device)
        pred = LETTERS[max(range(len(LETTERS)), key=lambda i: scores[i])]
        preds.append(pred)
        if q.answer:
            total += 1
            correct += pred == q.answer
    return SubjectResult(subject.name, correct, total, preds)
