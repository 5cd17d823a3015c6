"""Peak CPU memory of the last stage's loss: chunked LM-head loss vs full logits (issue 20).

    python benchmarks/lm_head_loss_memory.py [--vocab 151936] [--hidden 2048] [--seq 4096] [--out FILE.md]

One micro-batch of `--seq` tokens (MBS 1) through the LM head and cross-entropy, forward and
backward, float32 on the CPU, each path in a fresh process:

- logits: the path the last pipeline stage and TP used before: logits = h @ W.T, then
  cross_entropy(logits.float(), labels), the logits kept until the backward (the schedule holds
  the stage's output for it);
- chunked: qtrain.ops.linear_cross_entropy, the path every layout uses now (the reference
  implementation, as on CPU / Ascend and under TP > 1).

Memory is the CPU allocator's own count (benchmarks/cpu_peak_memory.py: the profiler's allocation
events; tracemalloc does not see tensors), from just before the forward to after the backward;
inputs and weights, made before, are not in it. "loss term" is that peak less the LM-head weight
gradient, which both paths return (`qtrain plan` counts it under "transient"); the growth of the
process's peak RSS over its RSS before the loss (after a small warm-up) is shown as a
cross-check. Prints a Markdown report (and writes it to --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
GIB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str, vocab: int, hidden: int, seq: int) -> dict:
    """One path's forward + backward in this process; its figures."""
    import torch
    import torch.nn.functional as F

    from cpu_peak_memory import cpu_peak_bytes
    from qtrain.labels import IGNORE_INDEX
    from qtrain.ops.linear_cross_entropy import linear_cross_entropy, loss_working_bytes

    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, seq, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq), generator=g)
    labels[0, -1] = IGNORE_INDEX  # the last position has no next token

    def logits_path():
        logits = h @ w.t()
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        loss.backward()
        return float(loss), logits  # the logits live until the backward is done

    def chunked_path():
        loss = linear_cross_entropy(h, w, labels, reduction="sum")
        loss.backward()
        return float(loss), None

    # Warm up (both paths' kernels and the profiler on a small shape), so that the RSS growth below
    # is the measured path's memory rather than libraries loading.
    small = torch.randn(8, hidden).requires_grad_(), torch.randn(64, hidden).requires_grad_()
    cpu_peak_bytes(lambda: (F.cross_entropy(small[0] @ small[1].t(), labels[0, :8] % 64, reduction="sum")
                            + linear_cross_entropy(small[0], small[1], labels[0, :8] % 64)).backward())
    rss0, t0 = rss_bytes(), time.perf_counter()
    (loss, _), peak, end = cpu_peak_bytes(logits_path if path == "logits" else chunked_path)
    seconds = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    head_grad = w.grad.nbytes
    out = {"path": path, "loss": loss, "peak": peak, "end": end, "head_grad": head_grad, "loss_term": peak - head_grad,
           "rss_growth": rss_peak - rss0, "seconds": seconds, "threads": torch.get_num_threads()}
    if path == "chunked":
        out["plan_loss_term"], out["plan_path"] = loss_working_bytes(seq, vocab, hidden, 4, device_type="cpu")
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    load = os.getloadavg()[0]
    import torch

    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem / GIB:.0f} GiB RAM, load average "
            f"{load:.1f} at start; Python {platform.python_version()}, torch {torch.__version__}")


def report(rows: dict, args, command: str, where: str) -> str:
    lg, ch = rows["logits"], rows["chunked"]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    gib = lambda x: f"{x / GIB:.3f}"  # noqa: E731
    lines = [
        f"# LM-head loss memory on the CPU: chunked vs full logits ({datetime.date.today()})",
        "",
        f"Machine: {where}.",
        f"Command: `{command}` (code at commit {commit or '?'}).",
        f"Shape: one micro-batch of {args.seq} tokens, hidden {args.hidden}, vocabulary {args.vocab:,}, float32, "
        "forward + backward of the summed token loss; each path in a fresh process.",
        "",
        "| path | peak allocated GiB | LM-head weight gradient GiB | loss term GiB (peak - head gradient) "
        "| peak RSS growth GiB | seconds |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in (lg, ch):
        lines.append(f"| {r['path']} | {gib(r['peak'])} | {gib(r['head_grad'])} | {gib(r['loss_term'])} "
                     f"| {gib(r['rss_growth'])} | {r['seconds']:.1f} |")
    ratio = ch["loss_term"] / lg["loss_term"]
    lines += [
        "",
        f"- loss term, chunked / logits: {ratio:.4f} (1/{1 / ratio:.1f}): "
        f"{'PASS' if ratio < 1 / 8 else 'FAIL'} (needs < 1/8)",
        f"- whole peak, head gradient included, chunked / logits: {ch['peak'] / lg['peak']:.3f}",
        f"- `qtrain plan`'s loss term for this shape ({ch['plan_path']}): {ch['plan_loss_term'] / 2**20:.1f} MiB, "
        f"measured {ch['loss_term'] / 2**20:.1f} MiB",
        f"- losses: logits {lg['loss']:.6f}, chunked {ch['loss']:.6f} "
        f"(relative difference {abs(lg['loss'] - ch['loss']) / abs(lg['loss']):.1e})",
        f"- torch threads: {ch['threads']}; times are from a shared machine and only indicative.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    ap.add_argument("--path", choices=("logits", "chunked"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.vocab, args.hidden, args.seq)))
        return 0
    rows, where = {}, machine()  # the load average before the runs
    for path in ("logits", "chunked"):
        cmd = [sys.executable, __file__, "--path", path, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
               "--seq", str(args.seq)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, QTRAIN_DEVICE="cpu"))
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            return 1
        rows[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{path}: {rows[path]}", file=sys.stderr)
    command = "python benchmarks/lm_head_loss_memory.py " + " ".join(sys.argv[1:])
    text = report(rows, args, command.strip(), where)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
