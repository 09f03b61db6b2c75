"""Which shards a (rank, worker) reads in an epoch.

Epoch mode: the shard list is shuffled with (seed, epoch) and dealt round-robin to the
``world_size * num_workers`` global workers, so every shard is read exactly once per epoch. With
fewer shards than global workers, every worker reads every shard and keeps the samples whose
running index modulo the worker count is its own (exactly once as well, at the cost of reading
the data several times; use more shards than workers to avoid it).

Resampled mode (official): each worker draws shards with replacement, forever; a "pseudo-epoch"
is ``ceil(shards / workers)`` draws, used only for progress and empty-dataset detection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ShardPlan:
    urls: list[str]
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1)
    resampled: bool = False
    # each URL's identity within the dataset (sources.expand_named_sources); None: the URLs
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.names is not None and len(self.names) != len(self.urls):
            raise ValueError(f"ShardPlan: {len(self.names)} names for {len(self.urls)} shard URLs")

    def name_map(self) -> dict[str, str]:
        """URL -> shard name."""
        return dict(zip(self.urls, self.names if self.names is not None else self.urls))

    @property
    def total_workers(self) -> int:
        return self.world_size * self.num_workers

    def global_worker(self, worker: int) -> int:
        return self.rank * self.num_workers + worker

    @property
    def split_by_sample(self) -> bool:
        """True when there are fewer shards than global workers (modulo split of samples)."""
        return not self.resampled and len(self.urls) < self.total_workers

    def shards(self, epoch: int, worker: int) -> list[str]:
        """The shard URLs worker ``worker`` of this rank reads in ``epoch``, in order."""
        g = self.global_worker(worker)
        if self.resampled:
            n = max(1, math.ceil(len(self.urls) / self.total_workers))
            rng = np.random.default_rng([self.seed, epoch, g, 7])
            return [self.urls[int(i)] for i in rng.integers(0, len(self.urls), size=n)]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        ordered = [self.urls[int(i)] for i in order]
        if self.split_by_sample:
            return ordered
        return ordered[g::self.total_workers]

    def sample_modulo(self, worker: int) -> tuple[int, int] | None:
        """(modulus, remainder) of the sample split, or None when shards are split."""
        if self.split_by_sample:
            return self.total_workers, self.global_worker(worker)
        return None
