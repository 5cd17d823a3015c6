"""What a model can take: token ids below its vocabulary size, sequences within its positions.

An id outside the embedding crashes the forward far from its cause (an IndexError on CPU, a
device-side assert on a GPU); a sequence longer than `max_position_embeddings` runs, but past
what the model was trained for. Both are refused with the input named.
"""

from __future__ import annotations

from typing import Sequence

from qtrain.errors import ConfigError, DataError


def check_ids(ids: Sequence[int], vocab_size: int, where: str, fix: str) -> None:
    """DataError naming `where` when an id is outside [0, vocab_size)."""
    if len(ids) == 0:
        return
    high, low = max(ids), min(ids)
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise DataError(f"{where}: token id {bad} is outside the model's vocabulary (0-{vocab_size - 1}); {fix}")


def tokenizer_fix(tokenizer) -> str:
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else "?"
    path = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    return (f"the tokenizer {path} ({size} tokens) does not belong to this model: pass the model's own with "
            f"--tokenizer-name-or-path")


def check_length(length: int, max_positions: int, what: str, fix: str) -> None:
    """ConfigError when `length` positions exceed the model's `max_position_embeddings`."""
    if length > max_positions:
        raise ConfigError(f"{what}: {length} tokens, more than the model's {max_positions} positions "
                          f"(max_position_embeddings in its config.json); {fix}")


def resolve_length(value: int | None, default: int, max_positions: int, flag: str) -> int:
    """An explicit `flag` must fit the model; the default is capped at its positions."""
    if value is None:
        return min(default, max_positions)
    if value <= 0:
        raise ConfigError(f"{flag} must be positive, got {value}")
    if value > max_positions:
        raise ConfigError(f"{flag} {value} exceeds the model's {max_positions} positions (max_position_embeddings "
                          f"in its config.json); use {flag} {max_positions} or less")
    return value
