"""Rank-aware loading: disjoint shards whose union covers every sample exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import SplitData

from ..dist_utils import run_distributed


def numbered_dataset(n_groups: int = 101) -> TabularDataset:
    """Groups of 1..3 rows; the dense feature holds each row's id so shards can be checked exactly."""
    sizes = np.random.default_rng(0).integers(1, 4, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    frame = pd.DataFrame({"u": group % 7, "g": group, "i": group % 5, "row_id": np.arange(len(group)), "y": 1.0})
    schema = Schema.from_dict(
        {
            "user_column": "u",
            "group_column": "g",
            "tables": [{"name": "t", "num_embeddings": 5}],
            "sparse_features": [{"name": "i", "column": "i", "table": "t"}],
            "dense_features": [{"name": "row_id", "column": "row_id"}],
            "tasks": [{"name": "y", "type": "binary", "label": "y"}],
        }
    )
    return TabularDataset(frame, schema, "numbered")


def _rank_rows(rank: int, world_size: int, epoch: int) -> dict[str, object]:
    loader = ShardedBatchLoader(numbered_dataset(), batch_size=8, rank=rank, world_size=world_size, seed=5)
    loader.set_epoch(epoch)
    rows: list[int] = []
    n_batches = 0
    for batch in loader:
        rows += batch.dense_features[:, 0].long().tolist()
        n_batches += 1
        # collectives stay in step only if every rank runs the same number of batches
        dist.all_reduce(torch.ones(1))
    return {"rows": rows, "batches": n_batches}


def test_two_gloo_ranks_cover_every_sample_once() -> None:
    total = len(numbered_dataset())
    results = run_distributed(_rank_rows, 2, 1)
    rows0, rows1 = (set(r["rows"]) for r in results)
    assert not rows0 & rows1
    assert sorted([*results[0]["rows"], *results[1]["rows"]]) == list(range(total))
    assert results[0]["batches"] == results[1]["batches"]


def test_epochs_reshuffle_and_groups_stay_whole() -> None:
    ds = numbered_dataset()
    loader = ShardedBatchLoader(ds, batch_size=8, seed=5)
    first = [r for b in loader for r in b.dense_features[:, 0].long().tolist()]
    loader.set_epoch(1)
    second = [r for b in loader for r in b.dense_features[:, 0].long().tolist()]
    assert sorted(first) == sorted(second) == list(range(len(ds)))
    assert first != second
    for batch in ShardedBatchLoader(ds, batch_size=8, seed=5):
        ids = batch.dense_features[:, 0].long().numpy()
        # a group's rows are adjacent, in one batch, and share group_index
        groups = np.searchsorted(ds.group_offsets, ids, side="right") - 1
        assert np.array_equal(np.unique(groups, return_inverse=True)[1].ravel() * 0 + groups, groups)
        assert len(np.unique(batch.group_index.numpy())) == len(np.unique(groups))


def test_resume_mid_epoch() -> None:
    ds = numbered_dataset()
    full = [b.dense_features[:, 0].tolist() for b in ShardedBatchLoader(ds, batch_size=8, seed=5)]
    loader = ShardedBatchLoader(ds, batch_size=8, seed=5)
    iterator = iter(loader)
    head = [next(iterator).dense_features[:, 0].tolist() for _ in range(3)]
    state = loader.state_dict()
    resumed = ShardedBatchLoader(ds, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    tail = [b.dense_features[:, 0].tolist() for b in resumed]
    assert head + tail == full


def test_ml100k_train_shards(ml100k_data: SplitData) -> None:
    train = ml100k_data.splits["train"]
    counts, batches = [], []
    for rank in range(2):
        loader = ShardedBatchLoader(train, batch_size=512, rank=rank, world_size=2)
        counts.append(sum(b.batch_size for b in loader))
        batches.append(len(loader))
    assert sum(counts) == 156_343
    assert batches[0] == batches[1]
