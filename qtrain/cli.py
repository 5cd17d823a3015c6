"""The one `qtrain` command: each subcommand lives in its own module, imported only when used.

This is the one error path: a subcommand's `main(argv)` raises, and `run` turns what it raised
into one line on stderr and the exit status (docs/promises.md):

    0    success (also a training run stopped by SIGTERM after saving)
    1    an error in the inputs, options, checkpoints or environment (QtrainError, or an OSError
         such as a full disk), printed as `qtrain <command>: error: <what, where, the fix>`
    2    the command line itself is wrong (UsageError: an unknown option, a missing one, a value
         of the wrong type), as argparse and Unix tools do, but in one line as well
    130  Ctrl-C (SIGINT);  143  SIGTERM when there was nothing to save

`QTRAIN_TRACEBACK=1` shows the traceback instead (for bug reports).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

import qtrain

# subcommand -> (module exposing `main(argv) -> int`, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("qtrain.env", "print versions, devices and the preprocessing tokenizer path; fail on a known-bad combination"),
    "preprocess": ("qtrain.data.preprocess", "corpus (parquet/jsonl/csv/txt/arrow) -> Megatron .bin/.idx"),
    "pretrain": ("qtrain.train.pretrain", "train a Qwen3 model on .bin/.idx data (torchrun)"),
    "sft": ("qtrain.train.sft", "supervised fine-tuning on instruction datasets (torchrun)"),
    "dpo": ("qtrain.train.dpo", "preference training on chosen/rejected pairs: DPO, SimPO, ORPO (torchrun)"),
    "convert": ("qtrain.checkpoint.convert", "convert checkpoints between hf, qtrain and Megatron (mg)"),
    "generate": ("qtrain.infer.generate", "generate text from a checkpoint or HF dir"),
    "evaluate": ("qtrain.infer.evaluate", "perplexity and multiple-choice accuracy"),
    "plan": ("qtrain.parallel.plan", "estimate per-device memory for a model and parallel layout"),
    "demo": ("qtrain.demo", "the default job: preprocess, train, save, export, generate on CPU"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every command: a command-line error is raised as UsageError (one line, exit 2)
    instead of printing the whole usage text."""

    def error(self, message: str):  # type: ignore[override]
        from qtrain.errors import UsageError

        raise UsageError(f"{message}; see `{self.prog} --help`")


def _usage() -> str:
    lines = [f"usage: qtrain <command> [options]   (qtrain {qtrain.__version__})", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    for name, (_, summary) in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}}  {summary}")
    lines += ["", "`qtrain <command> --help` lists a command's options."]
    return "\n".join(lines)


def one_line(text: object) -> str:
    """A message on one line (some library messages span several)."""
    return " ".join(str(text).split())


def _os_error(e: OSError) -> str:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or one_line(e) or type(e).__name__
    return f"{where}: {what}" if where else what


def run(name: str, fn: Callable[[], object]) -> int:
    """Run one command and turn how it ended into an exit status and at most one line on stderr."""
    from qtrain.errors import Interrupted, QtrainError, UsageError

    def say(message: str) -> None:
        print(f"qtrain {name}: {one_line(message)}", file=sys.stderr, flush=True)

    try:
        return int(fn() or 0)
    except (QtrainError, OSError, KeyboardInterrupt, Interrupted) as e:
        if os.environ.get("QTRAIN_TRACEBACK"):
            raise
        if isinstance(e, KeyboardInterrupt):
            say("interrupted (Ctrl-C); files are written whole or not at all, so what is on disk is consistent")
            return 130
        if isinstance(e, Interrupted):
            say(str(e))
            return e.exit_code
        say(f"error: {_os_error(e) if isinstance(e, OSError) else e}")
        return 2 if isinstance(e, UsageError) else 1
    finally:
        from qtrain.checkpoint.lock import release_all

        release_all()  # output dirs this command locked (checkpoint/lock.py)


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
        import difflib

        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"qtrain: error: unknown command {name!r}; {hint}the commands are {', '.join(SUBCOMMANDS)} "
              f"(`qtrain --help` says what each does)", file=sys.stderr)
        return 2
    return run(name, lambda: importlib.import_module(SUBCOMMANDS[name][0]).main(rest))


if __name__ == "__main__":
    sys.exit(main())
