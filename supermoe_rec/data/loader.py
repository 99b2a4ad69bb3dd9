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

# Batches per length-sorted pool of the generative layout (see ShardedBatchLoader._plan).
BUCKET_POOL = 16


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
        n_batches = max(min(math.ceil(max_rows / self.batch_size), min(len(s) for s in shards)), 1)
        mine = shards[self.rank]
        lengths = self.dataset.group_lengths
        if lengths is None or not self.shuffle:
            return list(np.array_split(mine, n_batches))
        # Generative layout: a batch pads its chunks to the longest one, so chunks of similar length go together.
        # Within each pool of BUCKET_POOL batches' worth of (shuffled) groups the groups are sorted by length, then
        # the batches are shuffled: every epoch still mixes users, and padding shrinks.
        per_batch = math.ceil(len(mine) / n_batches)
        pool = BUCKET_POOL * per_batch
        order = np.concatenate(
            [p[np.argsort(lengths[p], kind="stable")] for p in np.array_split(mine, max(1, -(-len(mine) // pool)))]
        )
        batches = np.array_split(order, n_batches)
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return [batches[i] for i in rng.permutation(len(batches))]

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
