"""Peak CPU memory of packed-document attention: the dense [S, S] mask path against cu_seqlens.

Both paths run, each in a fresh subprocess, the attention forward + backward of one pack of
`--docs` equal documents in `--seq` tokens with Qwen3-1.7B's attention shape (16 query heads, 8
key/value heads, head_dim 128), from identical inputs (q, k, v, the output gradient, and the
documents as per-token segment ids). What each path builds from the segment ids is its own cost:

  dense      the block-diagonal causal bool mask [1, 1, S, S] (what qtrain's packed SFT built
             before), then qtrain.ops.attention with that mask (SDPA; K/V repeated for GQA)
  documents  cu_seqlens, then qtrain.ops.attention with `docs` (one causal SDPA per document)

Measured two ways, after the inputs exist:
  torch      peak bytes of torch's CPU allocator during the call (profiler events,
             benchmarks/cpu_peak_memory.py): tensors only
  rss        the subprocess's peak resident set growth (ru_maxrss - RSS before the call):
             everything, allocator slack and library buffers included (glibc with a fixed 1 MiB
             mmap threshold in both, so freed large blocks leave the RSS alike)

Each is reported in full and as working memory: less the outputs both paths must return (the
attention output and dq, dk, dv: the same bytes in both), so that the ratio compares what the
paths themselves need.

    OMP_NUM_THREADS=2 python benchmarks/document_attention_memory.py --seq 16384 --docs 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, seq: int, docs: int, dtype_name: str, measure: str) -> dict:
    import torch

    from cpu_peak_memory import cpu_peak_bytes
    from qtrain.ops.attention import attention
    from qtrain.ops.document_attention import Documents, sample_cu_seqlens

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    q = torch.randn(1, 16, seq, 128, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 8, seq, 128, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 8, seq, 128, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, 16, seq, 128, dtype=dtype)
    segment = torch.arange(seq) * docs // seq  # documents of seq / docs tokens

    def dense():
        causal = torch.ones(seq, seq, dtype=torch.bool).tril_()
        mask = ((segment[:, None] == segment[None, :]) & causal)[None, None]
        del causal
        attention(q, k, v, mask).backward(grad)

    def documents():
        starts = torch.ones(seq, dtype=torch.bool)
        starts[1:] = segment[1:] != segment[:-1]
        attention(q, k, v, docs=Documents.from_sample_bounds(sample_cu_seqlens(starts)[None])).backward(grad)

    fn = {"dense": dense, "documents": documents}[path]
    outputs = sum(x.numel() * x.element_size() for x in (q, k, v, grad))  # out, dq, dk, dv: same sizes
    before = rss_bytes()
    start = time.perf_counter()
    if measure == "torch":
        _, peak, _ = cpu_peak_bytes(fn)
    else:
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"path": path, "measure": measure, "peak_bytes": peak, "outputs_bytes": outputs,
            "seconds": time.perf_counter() - start, "grad_checksum": float(q.grad.float().abs().sum())}


def run(path: str, args, measure: str) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--measure", measure, "--seq", str(args.seq),
           "--docs", str(args.docs), "--dtype", args.dtype]
    # glibc's dynamic mmap threshold keeps freed blocks in the heap (RSS) after the first large
    # frees; a fixed threshold returns every large block at once, the same way for both paths.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--child", choices=["dense", "documents"])
    p.add_argument("--measure", default="torch", choices=["torch", "rss"])
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.docs, args.dtype, args.measure)))
        return
    mib = 2**20
    print(f"seq {args.seq}, {args.docs} documents, 16 q / 8 kv heads, head_dim 128, {args.dtype}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}")
    print("| measure | path | peak MiB | working MiB (peak - outputs) | seconds |")
    print("|---|---|---|---|---|")
    ratios = {}
    for measure in ("torch", "rss"):
        res = {path: run(path, args, measure) for path in ("dense", "documents")}
        for path, r in res.items():
            print(f"| {measure} | {path} | {r['peak_bytes'] / mib:.0f} | "
                  f"{(r['peak_bytes'] - r['outputs_bytes']) / mib:.0f} | {r['seconds']:.1f} |")
        d, c = res["documents"], res["dense"]
        ratios[measure] = (d["peak_bytes"] / c["peak_bytes"],
                           (d["peak_bytes"] - d["outputs_bytes"]) / (c["peak_bytes"] - c["outputs_bytes"]))
        assert abs(d["grad_checksum"] - c["grad_checksum"]) <= 1e-3 * c["grad_checksum"], (d, c)
    for measure, (full, working) in ratios.items():
        print(f"documents / dense ({measure}): {full:.3f}x peak, {working:.3f}x working memory")


if __name__ == "__main__":
    main()
