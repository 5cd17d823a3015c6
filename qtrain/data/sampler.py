"""Megatron's pretraining sample order across data-parallel ranks, and a resumable loader.

The global sample sequence is ``0, 1, 2, ...`` of the (already shuffled) dataset. Megatron's
``MegatronPretrainingSampler`` cuts it into chunks of ``micro_batch_size * dp_size`` consecutive
samples; rank ``r`` takes samples ``[r * mbs, (r + 1) * mbs)`` of each chunk as its micro-batch.
A global batch is ``global_batch_size / (mbs * dp)`` consecutive chunks. Because the position is
one global count (``consumed_samples``), a run resumes at the next unseen sample, and it can
resume with a different data-parallel size.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from qtrain.errors import ConfigError, DataError


class PretrainingSampler:
    """Batch sampler: yields this rank's micro-batch index lists from ``consumed_samples`` on.

    Iteration stops before a chunk that would run past ``total_samples`` (Megatron's drop_last).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
    ) -> None:
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ConfigError(
                f"micro batch size ({micro_batch_size}) and data-parallel size ({data_parallel_size}) must be positive"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ConfigError(f"data-parallel rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if total_samples <= 0:
            raise ConfigError(f"the dataset has no samples (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ConfigError(
                f"no samples left: {consumed_samples} of {total_samples} already consumed; "
                "build the dataset for more samples (--train-iters) or start a new run"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed by one micro-batch on every rank (mbs * dp)."""
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.samples_per_step
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - chunk + 1, chunk):
            begin = start - self.consumed_samples + first
            yield list(range(begin, begin + self.micro_batch_size))


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the per-sample tensors of a micro-batch."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class ResumableLoader:
    """This rank's micro-batches, counting consumed samples on *delivery* (not on prefetch).

    ``state_dict()`` is ``{"consumed_samples": N}``, a global count shared by all ranks: after a
    restart (with any data-parallel size) iteration continues at global sample N. Each delivered
    micro-batch advances the count by ``micro_batch_size * data_parallel_size``.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        num_workers: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.vocab_size = vocab_size  # when given, every delivered token id is checked against it
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.num_workers = num_workers
        self._iter: Iterator[Any] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._iter = None  # restart the pipeline at the new position

    def _start(self) -> Iterator[Any]:
        sampler = PretrainingSampler(
            len(self.dataset), self.consumed_samples, self.micro_batch_size,
            self.data_parallel_rank, self.data_parallel_size,
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate, persistent_workers=False,
        )
        return iter(loader)

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        if self.vocab_size is not None:
            self._check_ids(batch)
        self.consumed_samples += self.micro_batch_size * self.data_parallel_size
        return batch

    def _check_ids(self, batch: dict[str, torch.Tensor]) -> None:
        """An id outside the embedding would crash the forward (or fault on a GPU) far from its cause."""
        ids = batch["input_ids"]
        labels = batch.get("labels")
        high = max(int(ids.max()), int(labels.max()) if labels is not None else -1)
        if high >= self.vocab_size or int(ids.min()) < 0:
            bad = high if high >= self.vocab_size else int(ids.min())
            first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
            raise DataError(
                f"--data-path: token id {bad} in samples {first}-{first + self.micro_batch_size - 1} is outside the "
                f"model's vocabulary (0-{self.vocab_size - 1}); the data was tokenized with another tokenizer than "
                f"the model's: preprocess it with the model's tokenizer, or size the embedding with --padded-vocab-size")
