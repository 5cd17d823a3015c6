"""`qtrain pretrain`: parse Megatron-style flags and run the training loop (under torchrun or not)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success (also after SIGTERM + save), 1 on a user error, printed without a traceback."""
    from qtrain.config import parse_args
    from qtrain.train.loop import pretrain
    from qtrain.train.runtime import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("pretrain", lambda: pretrain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
