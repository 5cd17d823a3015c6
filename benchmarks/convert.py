"""Time and peak memory of `qtrain convert` on a Qwen3-1.7B-shaped model (random bf16 weights).

    python benchmarks/convert.py --work /tmp/convert-bench [--out benchmarks/results/convert-DATE.md]

Writes a random HF checkpoint of the 1.7B shape (2 safetensors shards, streamed tensor by tensor so
making it needs little memory), then runs each conversion in its own process under
`/usr/bin/time -v` and reports wall time and peak RSS against the model's size on disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch

from qtrain.checkpoint.megatron_map import hf_param_names
from qtrain.models.presets import get_preset

# (label, convert arguments relative to the work dir); each reads the output of an earlier row
RUNS = [
    ("hf -> mg TP1 PP2", ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", "hf",
                          "--save-dir", "mg", "--target-pipeline-parallel-size", "2"]),
    ("mg TP1 PP2 -> hf", ["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", "mg",
                          "--save-dir", "hf_back"]),
    ("hf -> mg TP2 PP2", ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", "hf",
                          "--save-dir", "mg_tp2", "--target-tensor-parallel-size", "2",
                          "--target-pipeline-parallel-size", "2"]),
    ("hf -> qtrain (fp32 DCP)", ["--load-model-type", "hf", "--save-model-type", "qtrain", "--load-dir", "hf",
                                 "--save-dir", "qtrain"]),
]


def write_random_hf(folder: Path, shards: int = 2) -> int:
    """A Qwen3-1.7B-shaped HF dir of random bf16 tensors; returns the bytes of weights on disk."""
    cfg = get_preset("1.7B")
    folder.mkdir(parents=True, exist_ok=True)
    names = hf_param_names(cfg)
    h, q, kv, f = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    suffix = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
              "self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,),
              "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    shapes = {n: (cfg.vocab_size, h) if n == "model.embed_tokens.weight" else (h,) if n == "model.norm.weight"
              else suffix[n.split(".", 3)[3]] for n in names}
    per_shard = (len(names) + shards - 1) // shards
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per_shard:(s + 1) * per_shard]
        header, offset = {}, 0
        for n in part:
            nbytes = 2 * torch.Size(shapes[n]).numel()
            header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / file, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for n in part:
                t = torch.randn(shapes[n], generator=gen).mul_(0.02).to(torch.bfloat16)
                out.write(t.view(torch.uint8).numpy().tobytes())
                weight_map[n] = file
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict("bfloat16")))
    return total


def timed_convert(args: list[str], work: Path) -> tuple[float, float, float, str]:
    """(wall s, CPU s (user + sys), peak RSS bytes, qtrain's last line) of one conversion in a fresh process."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "qtrain", "convert", *args]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(x) if x else 0.0 for x in wall.groups())
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1))
              for kind in ("User", "System"))
    return hours * 3600 + minutes * 60 + seconds, cpu, rss_kb * 1024, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/qtrain-convert-bench"))
    p.add_argument("--out", type=Path, default=None, help="markdown results file (default: print only)")
    p.add_argument("--note", default="", help="a sentence on the conditions (e.g. machine load) for the results")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    size = write_random_hf(args.work / "hf")
    rows = []
    for label, conv in RUNS:
        os.sync()  # start each run without the previous run's writes still being flushed
        load = os.getloadavg()[0]  # the machine is shared: a busy one stretches wall time, not CPU time
        wall, cpu, rss, line = timed_convert(conv, args.work)
        rows.append((label, wall, cpu, rss, load))
        print(f"{label}: {wall:.1f} s ({cpu:.1f} CPU s, load {load:.1f}), peak RSS {rss / 2**30:.2f} GiB "
              f"({rss / size:.2f}x model on disk)  [{line}]")
    lines = [
        f"# qtrain convert: Qwen3-1.7B shape, CPU ({datetime.date.today().isoformat()})", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM (shared with other jobs); "
        f"torch {torch.__version__}. Script: benchmarks/convert.py.", "",
        f"Source: random bf16 weights, Qwen3-1.7B shape (28 layers, hidden 2048, vocab 151936, tied), "
        f"2 safetensors shards, {size / 1e9:.2f} GB of weights on disk. Each conversion runs in a fresh "
        f"process under `/usr/bin/time -v`, after an `os.sync()` (page cache warm: the source was just written).", "",
        "| conversion | wall s | CPU s (user+sys) | load avg at start | peak RSS GiB | peak RSS / model on disk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {label} | {wall:.1f} | {cpu:.1f} | {load:.1f} | {rss / 2**30:.2f} | {rss / size:.2f}x |"
              for label, wall, cpu, rss, load in rows]
    if args.note:
        lines += ["", args.note]
    lines += ["", "Target (issue 7): under a minute, peak RSS under 1.5x the model's size on disk. The qtrain "
              "output is fp32 (twice the bf16 source), so its RSS is compared with the bf16 source size too."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
