"""Perplexity of a model on token sequences: exp(mean next-token negative log-likelihood).

Each sequence is cut into consecutive windows of at most `seq_length` predicted tokens that
overlap by one token, so every token but a sequence's first is predicted exactly once, from the
tokens before it in its window (the context restarts at each window, as Megatron's evaluation
does with non-overlapping samples). NLL is summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from qtrain.labels import IGNORE_INDEX
from qtrain.models.qwen3 import Qwen3ForCausalLM


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int
    sequences: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_nll))


def windows(tokens: np.ndarray, seq_length: int) -> Iterator[np.ndarray]:
    """Windows of up to seq_length + 1 tokens, overlapping by one (every token after the first is a target once)."""
    for start in range(0, max(len(tokens) - 1, 0), seq_length):
        yield tokens[start:start + seq_length + 1]


@torch.no_grad()
def perplexity(model: Qwen3ForCausalLM, sequences: Iterable[np.ndarray], seq_length: int, batch_size: int = 8,
               device: torch.device | str = "cpu") -> PerplexityResult:
    """Token-weighted perplexity over `sequences` (1-D int arrays; those shorter than 2 tokens add nothing)."""
    nll, count, n_seq = 0.0, 0, 0
    pending: list[np.ndarray] = []

    def flush() -> None:
        nonlocal nll, count
        width = max(len(w) for w in pending) - 1
        ids = torch.zeros(len(pending), width, dtype=torch.long)
        labels = torch.full((len(pending), width), IGNORE_INDEX, dtype=torch.long)
        for i, w in enumerate(pending):
            t = torch.from_numpy(np.asarray(w, dtype=np.int64))
            ids[i, :len(t) - 1], labels[i, :len(t) - 1] = t[:-1], t[1:]
        total = model(ids.to(device), labels=labels.to(device), loss_reduction="sum")
        nll += float(total.double())
        count += int((labels != IGNORE_INDEX).sum())
        pending.clear()

    for seq in sequences:
        n_seq += 1
        for w in windows(np.asarray(seq), seq_length):
            pending.append(w)
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return PerplexityResult(nll, count, n_seq)
