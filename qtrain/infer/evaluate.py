"""`qtrain evaluate`: perplexity on a .bin/.idx dataset or a text file, and multiple-choice accuracy
on MMLU / C-Eval CSV directories; prints a table and writes the results as JSON.

    qtrain evaluate --load CKPT --data-path data/wiki_text_document --seq-length 2048
    qtrain evaluate --load CKPT --text-file notes.txt
    qtrain evaluate --load CKPT --task mmlu --data-dir mmlu/data --shots 5 --output-json mmlu.json

Given both a perplexity input and --data-dir, both run; the JSON then has one entry per task.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qtrain.cli import ArgumentParser
from qtrain.errors import ConfigError, DataError
from qtrain.infer import limits
from qtrain.io_utils import check_writable_file, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="qtrain evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="HF model dir, qtrain save dir (or iter_XXXXXXX) or Megatron dir")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the tracker's)")
    p.add_argument("--lora-load", default=None, help="PEFT LoRA adapter dir to merge into the weights")
    p.add_argument("--tokenizer-name-or-path", default=None,
                   help="HF tokenizer dir (default: the one saved with --load, else the bundled Qwen3 tokenizer)")
    p.add_argument("--task", choices=["ppl", "mmlu", "ceval"], default=None,
                   help="ppl (with --data-path or --text-file) or multiple choice (with --data-dir); "
                        "default: from the inputs given")
    p.add_argument("--data-path", default=None, help="perplexity: prefix of a .bin/.idx dataset")
    p.add_argument("--text-file", default=None, help="perplexity: a UTF-8 text file, tokenized whole")
    p.add_argument("--seq-length", type=int, default=None,
                   help="perplexity: tokens predicted per window (default: 2048, or the model's positions if fewer)")
    p.add_argument("--max-sequences", type=int, default=None, help="perplexity: stop after this many sequences")
    p.add_argument("--data-dir", default=None, help="multiple choice: directory of <subject>_{dev,test,val}.csv")
    p.add_argument("--split", default="test", choices=["test", "val"], help="multiple choice: files scored")
    p.add_argument("--subjects", default=None, help="multiple choice: comma-separated subjects (default: all)")
    p.add_argument("--shots", type=int, default=0, help="multiple choice: solved dev examples in the prompt")
    p.add_argument("--mc-score", choices=["letter", "text"], default="letter",
                   help="multiple choice: log-likelihood of the answer letter or of the choice text")
    p.add_argument("--max-length", type=int, default=None,
                   help="multiple choice: longest prompt, drops shots to fit (default: 4096, or the model's positions "
                        "if fewer)")
    p.add_argument("--batch-size", type=int, default=8, help="perplexity windows per forward")
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--device", default="auto", help="cpu, cuda, npu or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights dtype (auto: bfloat16 on an accelerator, float32 on CPU)")
    return p


def _tasks(args) -> list[str]:
    """Every evaluation whose input is given (--task ppl keeps perplexity only; mmlu/ceval name the
    multiple-choice result)."""
    ppl = bool(args.data_path or args.text_file)
    mc = bool(args.data_dir) and args.task != "ppl"
    if args.task == "ppl" and not ppl:
        raise ConfigError("--task ppl needs --data-path PREFIX or --text-file FILE")
    if args.task in ("mmlu", "ceval") and not args.data_dir:
        raise ConfigError(f"--task {args.task} needs --data-dir (a directory of <subject>_dev/_{args.split}.csv)")
    tasks = (["ppl"] if ppl else []) + ([args.task if args.task in ("mmlu", "ceval") else "mmlu"] if mc else [])
    if not tasks:
        raise ConfigError("give --data-path or --text-file (perplexity) or --data-dir (multiple choice)")
    return tasks


def run_ppl(args, model, tokenizer_loader, device) -> dict:
    from qtrain.infer.perplexity import perplexity

    if bool(args.data_path) == bool(args.text_file):
        raise ConfigError("perplexity needs exactly one of --data-path PREFIX or --text-file FILE")
    if args.data_path:
        from qtrain.data.indexed import IndexedDataset

        ds = IndexedDataset(args.data_path)
        n = len(ds) if args.max_sequences is None else min(len(ds), args.max_sequences)
        vocab = model.config.vocab_size
        fix = "the data was tokenized for another model: preprocess it with this model's tokenizer"
        sequences = (_checked(ds[i], vocab, f"--data-path {args.data_path} sequence {i}", fix) for i in range(n))
        source = args.data_path
    else:
        path = Path(args.text_file)
        if not path.is_file():
            raise DataError(f"--text-file {path}: no such file")
        tokenizer = tokenizer_loader()
        ids = tokenizer(path.read_text(encoding="utf-8")).input_ids
        limits.check_ids(ids, model.config.vocab_size, f"--text-file {path}", limits.tokenizer_fix(tokenizer))
        sequences = [ids]
        source = str(path)
    res = perplexity(model, sequences, args.seq_length, args.batch_size, device)
    if res.tokens == 0:
        raise DataError(f"{source}: no sequence has two or more tokens; nothing to score")
    print(f"{'source':<40} {'sequences':>10} {'tokens':>12} {'mean NLL':>10} {'perplexity':>12}")
    print(f"{source[-40:]:<40} {res.sequences:>10} {res.tokens:>12} {res.mean_nll:>10.4f} {res.perplexity:>12.4f}")
    return {"task": "ppl", "source": source, "seq_length": args.seq_length, "sequences": res.sequences,
            "tokens": res.tokens, "nll_sum": res.nll_sum, "mean_nll": res.mean_nll, "perplexity": res.perplexity}


def _checked(seq, vocab_size: int, where: str, fix: str):
    if len(seq):
        limits.check_ids([int(seq.max()), int(seq.min())], vocab_size, where, fix)
    return seq


def run_multiple_choice(args, task, model, tokenizer, device) -> dict:
    from qtrain.infer.multiple_choice import evaluate_subject, load_subjects

    if args.shots < 0:
        raise ConfigError(f"--shots must be >= 0, got {args.shots}")
    subjects = load_subjects(args.data_dir, args.split, args.subjects.split(",") if args.subjects else None)
    results = [evaluate_subject(model, tokenizer, s, args.shots, args.mc_score, args.max_length, device)
               for s in subjects]
    correct, total = sum(r.correct for r in results), sum(r.total for r in results)
    width = max(12, *(len(r.name) for r in results))
    print(f"{'subject':<{width}} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for r in results:
        print(f"{r.name:<{width}} {r.correct:>8} {r.total:>6} {r.accuracy:>9.4f}")
    overall = correct / total if total else 0.0
    print(f"{'overall':<{width}} {correct:>8} {total:>6} {overall:>9.4f}")
    if total == 0:
        print(f"(no answers in the *_{args.split}.csv files: accuracy cannot be computed; C-Eval test answers "
              "are hidden, use --split val)")
    return {"task": task, "data_dir": str(args.data_dir), "split": args.split, "shots": args.shots,
            "score": args.mc_score, "correct": correct, "total": total, "accuracy": overall,
            "subjects": {r.name: {"correct": r.correct, "total": r.total, "accuracy": r.accuracy,
                                  "predictions": r.predictions} for r in results}}


def main(argv: list[str]) -> int:
    from qtrain import device as qdevice
    from qtrain.data.tokenizer import find_qwen3_tokenizer, load_hf_tokenizer
    from qtrain.infer.loading import load_model_for_inference

    args = build_parser().parse_args(argv)
    tasks = _tasks(args)
    if args.output_json:
        check_writable_file(args.output_json, "--output-json")
    dev = torch.device(qdevice.device_type() if args.device == "auto" else args.device)
    dtype = (torch.float32 if dev.type == "cpu" else torch.bfloat16) if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok_dir = load_model_for_inference(args.load, dtype, dev, args.iteration, args.lora_load)
    positions = model.config.max_position_embeddings
    args.seq_length = limits.resolve_length(args.seq_length, 2048, positions, "--seq-length")
    args.max_length = limits.resolve_length(args.max_length, 4096, positions, "--max-length")

    def tokenizer():
        return load_hf_tokenizer(args.tokenizer_name_or_path or tok_dir or find_qwen3_tokenizer())

    results = {}
    for task in tasks:
        if task == "ppl":
            results[task] = run_ppl(args, model, tokenizer, dev)
        else:
            results[task] = run_multiple_choice(args, task, model, tokenizer(), dev)
    # One evaluation: its fields at the top level; several: one entry per task.
    result = next(iter(results.values())) if len(results) == 1 else dict(results)
    result["model"] = str(args.load)
    if args.output_json:
        write_json_atomic(args.output_json, result)
    return 0
