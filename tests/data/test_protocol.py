"""ml100k-mt on the real MovieLens-100k: the expected sizes (docs/protocol.md#expected-sizes) and the invariants."""

from __future__ import annotations

import numpy as np
import pandas as pd

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.data.protocol import ProtocolOutput, build_ml_mt, split_sizes
from supermoe_rec.data.splits import SplitData


def test_real_ml100k_counts(ml100k: MovieLens) -> None:
    assert ml100k.summary() == {"ratings": 100_000, "users": 943, "items": 1682}
    assert len(ml100k.users) == 943
    assert len(ml100k.items) == 1682


def test_expected_split_sizes(ml100k_data: SplitData) -> None:
    summary = ml100k_data.summary()
    expected = {"train": (156_343, 78_179), "valid": (20_878, 10_439), "test": (20_878, 10_439)}
    for split, (samples, positives) in expected.items():
        assert summary["splits"][split]["samples"] == samples
        assert summary["splits"][split]["positives"] == positives
        assert summary["splits"][split]["labelled"] == {"watch": samples, "like": positives, "rating": positives}
    assert sum(s["positives_without_negative"] for s in summary["splits"].values()) == 15


def test_split_sizes_rule() -> None:
    # ceil(10%) at least 1 for test and valid, the rest train.
    assert split_sizes(20, 0.1, 0.1) == (16, 2, 2)
    assert split_sizes(21, 0.1, 0.1) == (15, 3, 3)
    assert split_sizes(3, 0.1, 0.1) == (1, 1, 1)


def _ratings_by_user(ml: MovieLens) -> dict[int, pd.DataFrame]:
    r = ml.ratings.sort_values(["user_id", "timestamp", "item_id"])
    return {int(u): g for u, g in r.groupby("user_id")}


def test_temporal_split_no_leak(ml100k_protocol: ProtocolOutput) -> None:
    f = ml100k_protocol.frames
    train_last = f["train"].groupby("user_id")["timestamp"].max()
    valid_first = f["valid"].groupby("user_id")["timestamp"].min()
    valid_last = f["valid"].groupby("user_id")["timestamp"].max()
    test_first = f["test"].groupby("user_id")["timestamp"].min()
    assert (test_first >= train_last.reindex(test_first.index)).all()
    assert (test_first >= valid_last.reindex(test_first.index)).all()
    assert (valid_first >= train_last.reindex(valid_first.index)).all()
    # positions: every test position is after every train position of the same user
    pos = {k: v.groupby("user_id")["position"] for k, v in f.items()}
    assert (pos["test"].min() > pos["train"].max().reindex(pos["test"].min().index)).all()


def test_histories_hold_only_earlier_items(ml100k: MovieLens, ml100k_protocol: ProtocolOutput) -> None:
    by_user = _ratings_by_user(ml100k)
    frame = ml100k_protocol.frames["test"]
    rng = np.random.default_rng(0)
    for row in rng.choice(len(frame), 300, replace=False):
        sample = frame.iloc[row]
        items = by_user[int(sample.user_id)]["item_id"].to_numpy()
        p = int(sample.position)
        expected = items[max(0, p - 50) : p]  # raw item ids == codes on ML-100k (ids are 1..1682)
        assert np.array_equal(sample.history, expected)
        times = by_user[int(sample.user_id)]["timestamp"].to_numpy()[max(0, p - 50) : p]
        assert (times <= sample.timestamp).all()


def test_negatives_unrated_existing_at_most_one(ml100k: MovieLens, ml100k_protocol: ProtocolOutput) -> None:
    first_time = ml100k.ratings.groupby("item_id")["timestamp"].min()
    rated = set(zip(ml100k.ratings.user_id, ml100k.ratings.item_id, strict=True))
    for split, frame in ml100k_protocol.frames.items():
        neg = frame[frame.watch == 0]
        assert not any((u, i) in rated for u, i in zip(neg.user_id, neg.item_id, strict=True)), split
        assert (first_time.reindex(neg.item_id).to_numpy() <= neg.timestamp.to_numpy()).all(), split
        per_group = frame.groupby("group_id")["watch"].agg(["size", "sum"])
        assert per_group["sum"].eq(1).all() and per_group["size"].le(2).all(), split
        # the negative shares its positive's user, time and history
        pairs = frame[frame.group_id.isin(per_group.index[per_group["size"] == 2])]
        assert pairs.groupby("group_id")[["user_id", "timestamp"]].nunique().eq(1).all().all()


def test_seeded_determinism(ml100k: MovieLens) -> None:
    a = build_ml_mt(ml100k, DataConfig(seed=3)).frames["valid"]
    b = build_ml_mt(ml100k, DataConfig(seed=3)).frames["valid"]
    c = build_ml_mt(ml100k, DataConfig(seed=4)).frames["valid"]
    assert a["item_id"].equals(b["item_id"])
    assert len(a) == len(c) and not a["item_id"].equals(c["item_id"])
    # only negatives depend on the seed
    assert a.loc[a.watch == 1, "item_id"].equals(c.loc[c.watch == 1, "item_id"])


def test_labels_and_task_masks(ml100k_data: SplitData) -> None:
    ds = ml100k_data.splits["train"]
    watch, like, rating = ds.labels.T
    m_watch, m_like, m_rating = ds.task_mask.T
    assert m_watch.all()
    assert np.array_equal(m_like, watch) and np.array_equal(m_rating, watch)
    assert set(np.unique(rating[m_rating == 1])) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.array_equal(like[m_like == 1], (rating[m_rating == 1] >= 4).astype(np.float32))
    assert not np.isnan(ds.labels).any()
