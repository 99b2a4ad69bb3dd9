"""Rank-aware batch loading: each rank reads a disjoint shard of groups, and the union covers every sample once.

Sharding is by *group* (a user-side pass shared by its candidates), so a group never straddles ranks or batches.
Every rank yields the same number of batches per epoch, which keeps collective calls in step; the data position
(epoch, batches done) is part of the state dict so a resumed run continues mid-epoch where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from supermoe_rec.data.batch import Batch
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.jagged import IntArray


class ShardedBatchLoader:
    """Iterate over one rank's batches of a :class:`TabularDataset`.

    Args:
        dataset: the samples.
        batch_size: rows per batch on this rank (a batch holds whole groups, so it may be a row or two smaller).
        rank: this process's rank.
        world_size: number of ranks.
        shuffle: shuffle groups each epoch (seeded by ``seed`` and the epoch).
        seed: shuffling seed; the same on every rank.
        candidates: the next-items candidate ids of the batch at a step key (the same key, so the same ids, on
            every rank); only for schemas with ``next_items``.

    Example::

        >>> import pandas as pd
        >>> from supermoe_rec.data.schema import Schema
        >>> schema = Schema.from_dict({"user_column": "u", "tables": [{"name": "t", "num_embeddings": 9}],
        ...     "sparse_features": [{"name": "i", "column": "i", "table": "t"}],
        ...     "tasks": [{"name": "y", "type": "binary", "label": "y"}]})
        >>> ds = TabularDataset(pd.DataFrame({"u": [0] * 6, "i": range(6), "y": [1] * 6}), schema, "demo")
        >>> [b.batch_size for b in ShardedBatchLoader(ds, batch_size=2, rank=1, world_size=2, shuffle=False)]
        [2, 1]
    """

    def __init__(
        self,
        dataset: TabularDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        candidates: Callable[[int], IntArray] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if dataset.num_groups < world_size:
            raise ValueError(
                f"{dataset.source}: {dataset.num_groups} group(s) cannot be sharded over {world_size} ranks"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.candidates = candidates
        self.epoch = 0
        self.batches_done = 0  # within the current epoch, for resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches_done = 0

    def _shard_groups(self) -> list[IntArray]:
        """Group ids of every rank for this epoch (computed identically on all ranks)."""
        groups = np.arange(self.dataset.num_groups, dtype=np.int64)
        if self.shuffle:
            groups = np.random.default_rng([self.seed, self.epoch]).permutation(groups)
        return [groups[r :: self.world_size] for r in range(self.world_size)]

    def _plan(self) -> list[IntArray]:
        shards = self._shard_groups()
        sizes = self.dataset.group_sizes()
        max_rows = max(int(sizes[s].sum()) for s in shards)
        # Same batch count on every rank; never more batches than the smallest shard has groups.
        n_batches = min(math.ceil(max_rows / self.batch_size), min(len(s) for s in shards))
        return list(np.array_split(shards[self.rank], max(n_batches, 1)))

    def __len__(self) -> int:
        return len(self._plan())

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan()
        while self.batches_done < len(plan):
            groups = plan[self.batches_done]
            self.batches_done += 1
            key = self.epoch * 1_000_003 + self.batches_done  # the same on every rank
            candidates = self.candidates(key) if self.candidates is not None else None
            yield self.dataset.batch_of_groups(groups, candidates)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.seed = int(state["seed"])
