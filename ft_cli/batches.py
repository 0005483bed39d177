"""Which rows make up each micro-batch: a pure function of (seed, epoch, position), so resuming needs only a step.

The training stream is epochs laid end to end; micro-batch m belongs to epoch m // per_epoch. Every rank sees
the same global batch order and takes its own slice, so no sampler state needs saving and every rank has the
same number of micro-batches (the last global batch of an epoch wraps around to the epoch's first rows).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any


def micro_batches_per_epoch(num_rows: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Global batches in one pass over the rows (the last one wraps around to the epoch's first rows)."""
    return math.ceil(num_rows / (micro_batch_size * world_size))


def total_steps(max_steps: int | None, epochs: float, per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of a run: train.max_steps, else the epochs' micro-batches over grad_accum (at least 1)."""
    return max_steps or max(1, math.ceil(epochs * per_epoch / grad_accum))


class MicroBatches:
    def __init__(self, num_rows: int, micro_batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, lengths: list[int] | None = None):
        if num_rows <= 0:
            raise ValueError("no training rows")
        self.n, self.mbs, self.world, self.rank = num_rows, micro_batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.lengths = lengths  # data.group_by_length: row lengths, to batch rows of similar length together
        self.global_batch = micro_batch_size * world_size
        self.per_epoch = micro_batches_per_epoch(num_rows, micro_batch_size, world_size)

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs live at most; the object lives as long as the run
    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return order
        # Length grouping, as HF Trainer's group_by_length: the shuffled rows in windows of 64 global batches,
        # each window sorted by length (longest first), cut into global batches, and the batches shuffled, so a
        # batch holds rows of similar length (little padding) while the epoch stays in random order.
        window = 64 * self.global_batch
        chunks = [sorted(order[i:i + window], key=lambda r: -self.lengths[r]) for i in range(0, self.n, window)]
        grouped = [r for chunk in chunks for r in chunk]
        batches = [grouped[i:i + self.global_batch] for i in range(0, self.n, self.global_batch)]
        last = batches.pop() if len(batches[-1]) < self.global_batch else None  # stays last (the epoch wraps)
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [r for i in perm for r in batches[i]] + (last or [])

    def indices(self, m: int) -> list[int]:
        """Row indices of this rank's m-th micro-batch of the whole run."""
        epoch, pos = divmod(m, self.per_epoch)
        order = self._order(epoch)
        start = pos * self.global_batch + self.rank * self.mbs
        return [order[(start + i) % self.n] for i in range(self.mbs)]

    def epoch_of(self, m: int) -> float:
        return m / self.per_epoch


def rows_at(dataset: Any, indices: list[int]) -> list[dict[str, Any]]:
    """The rows of a datasets.Dataset at `indices` (one micro-batch), as dicts for the collator."""
    cols = dataset[indices]
    return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]


class _Rows:
    """The training rows as a map-style dataset whose batched fetch (`__getitems__`, which torch's DataLoader uses
    when present) takes a whole micro-batch at once, as one Arrow read."""

    def __init__(self, dataset: Any, fetch: Any) -> None:
        self.dataset, self.fetch = dataset, fetch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return self.fetch(self.dataset, indices)


class _Sampler:
    """MicroBatches as a batch sampler: this rank's micro-batches `start` .. `stop - 1` of the whole run, in order.
    Starting from any micro-batch is what an exact resume needs."""

    def __init__(self, batches: MicroBatches, start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        return (self.batches.indices(m) for m in range(self.start, self.stop))


def train_loader(dataset: Any, batches: MicroBatches, collate: Any, *, start: int, stop: int, workers: int,
                 pin_memory: bool, fetch: Any = rows_at, worker_init: Any = None) -> Any:
    """A torch DataLoader over ft's own micro-batch order: the rows of micro-batches start..stop-1, collated.

    With `workers` > 0 the next batches are read and collated in a worker process while the model trains on the
    current one (and, with `pin_memory`, copied to page-locked memory for a faster host-to-GPU transfer). The order
    is MicroBatches' whatever the workers: the loader only moves the work, so exact resume and multi-process
    equivalence hold as without it."""
    import torch
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": 2, "persistent_workers": False} if workers else {}
    # A generator of its own: each iter() draws a base seed for its workers, which from the global generator would
    # shift the model's random stream (dropout) by one draw, so a resumed run would not repeat the original.
    return DataLoader(_Rows(dataset, fetch), batch_sampler=_Sampler(batches, start, stop), collate_fn=collate,
                      num_workers=workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=worker_init, **extra)
