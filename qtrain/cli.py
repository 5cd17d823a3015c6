"""The one `qtrain` command: each subcommand lives in its own module, imported only when used."""

from __future__ import annotations

import importlib
import sys

import qtrain

# subcommand -> (module exposing `main(argv) -> int`, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("qtrain.env", "print versions, devices and the preprocessing tokenizer path; fail on a known-bad combination"),
    "preprocess": ("qtrain.data.preprocess", "corpus (parquet/jsonl/csv/txt/arrow) -> Megatron .bin/.idx"),
    "pretrain": ("qtrain.train.pretrain", "train a Qwen3 model on .bin/.idx data (torchrun)"),
    "sft": ("qtrain.train.sft", "supervised fine-tuning on instruction datasets (torchrun)"),
    "convert": ("qtrain.checkpoint.convert", "convert checkpoints between hf, qtrain and Megatron (mg)"),
    "generate": ("qtrain.infer.generate", "generate text from a checkpoint or HF dir"),
    "evaluate": ("qtrain.infer.evaluate", "perplexity and multiple-choice accuracy"),
    "plan": ("qtrain.parallel.plan", "estimate per-device memory for a model and parallel layout"),
    "demo": ("qtrain.demo", "the default job: preprocess, train, save, export, generate on CPU"),
}


def _usage() -> str:
    lines = [f"usage: qtrain <command> [options]   (qtrain {qtrain.__version__})", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    for name, (_, summary) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {summary}")
    lines += ["", "`qtrain <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"qtrain {qtrain.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"qtrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from qtrain.errors import QtrainError

    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except QtrainError as e:  # a user's mistake: the message says what and where, no traceback
        print(f"qtrain {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
