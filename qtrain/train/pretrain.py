"""`qtrain pretrain`: parse Megatron-style flags and run the training loop (under torchrun or not)."""

from __future__ import annotations

import sys

from qtrain.errors import QtrainError


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success (also after SIGTERM + save), 1 on a user error, printed without a traceback."""
    from qtrain.config import parse_args
    from qtrain.train.loop import pretrain
    from qtrain.train.runtime import shutdown

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_args(argv)
        pretrain(cfg)
    except QtrainError as e:
        print(f"qtrain pretrain: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
