"""The ml-mt multi-task protocol over MovieLens (``ml100k-mt`` v2, docs/protocol.md#ml100k-mt), deterministic by seed.

- **Split**: each user's ratings sorted by (timestamp, item_id); by position, the last ``test_fraction`` (ceil, at
  least 1) go to test, the ``valid_fraction`` before that (ceil, at least 1) to valid, the rest to train.
- **Samples**: every rating at position p >= 1 is a positive; its history is the items at positions
  max(0, p - max_history) .. p - 1. Each positive gets one negative with the same user, history and time: an item
  drawn uniformly (seeded) among items the user never rated AND that already existed then (first rated by anyone
  at or before the sample's timestamp). Where no such item exists the positive has no negative; such positives are
  counted (15 on ML-100k).
- **Tasks**: ``watch`` (binary, every sample), ``like`` (rating >= 4, positives only), ``rating`` (1..5,
  positives only). Negatives carry NaN for like/rating, and the schema's "label present = labelled" rule turns
  that into the task mask.
- A positive and its negative form one *group* (same user and history), so the encoder runs once for both.

Encoded feature columns use code 0 for "unknown", so every table reserves row 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.errors import DataError, first_true
from supermoe_rec.data.generative import UserSequences
from supermoe_rec.data.jagged import IntArray, offsets_from_lengths
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.data.schema import Schema

SPLITS = ("train", "valid", "test")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # buckets <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
YEAR_EDGES = (1950, 1960, 1970, 1980, 1990, 1995, 1996, 1997, 1998)  # <1950, 1950s, .., 1990-94, 95, 96, 97, 98+


@dataclass
class ProtocolOutput:
    """Per-split sample tables (one row per candidate), the schema that reads them, and protocol counts."""

    frames: dict[str, pd.DataFrame]
    schema: Schema
    # Per split: ratings, positives, negatives, positives_without_negative, histories_truncated.
    split_counts: dict[str, dict[str, int]]
    # Every user's whole sequence of item codes in the protocol's order (the generative layout reads it; a sample's
    # "position" column is the index of its target in that sequence).
    sequences: UserSequences | None = None


def _codes(values: pd.Series) -> tuple[IntArray, int]:
    """Sorted-vocabulary codes starting at 1 (0 = unknown); returns codes and the table size."""
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int64) + 1, len(uniques) + 1


def _bucket(values: pd.Series, edges: tuple[int, ...]) -> IntArray:
    """1-based bucket of each value by ``edges``; NaN gives 0 (unknown)."""
    array = values.to_numpy(np.float64)
    out = np.searchsorted(np.asarray(edges, dtype=np.float64), array, side="right").astype(np.int64) + 1
    out[np.isnan(array)] = 0
    return out


def build_ml_mt(ml: MovieLens, cfg: DataConfig) -> ProtocolOutput:
    """Build the ml-mt samples for every split from MovieLens frames."""
    # Leave-one-out follows RecBole's sequential protocol: equal timestamps keep the file's order.
    order = ["user_id", "timestamp"] if cfg.leave_one_out else ["user_id", "timestamp", "item_id"]
    ratings = ml.ratings.sort_values(order, kind="stable").reset_index(drop=True)
    unknown_items = ~ratings["item_id"].isin(ml.items["item_id"])
    if unknown_items.any():
        row = first_true(unknown_items.to_numpy())
        raise DataError(ml.source, "rated item is missing from the item table", row=row, column="item_id")
    unknown_users = ~ratings["user_id"].isin(ml.users["user_id"])
    if unknown_users.any():
        row = first_true(unknown_users.to_numpy())
        raise DataError(ml.source, "rating user is missing from the user table", row=row, column="user_id")

    # ---- encoders (over the full user/item tables, so codes do not depend on the split)
    users = ml.users.sort_values("user_id").reset_index(drop=True)
    items = ml.items.sort_values("item_id").reset_index(drop=True)
    user_code, n_user = _codes(users["user_id"])
    gender, n_gender = _codes(users["gender"])
    occupation, n_occupation = _codes(users["occupation"])
    zip3, n_zip3 = _codes(users["zip_code"].str[:3])
    age = _bucket(users["age"], AGE_EDGES)
    item_code, n_item = _codes(items["item_id"])
    year = _bucket(items["year"], YEAR_EDGES)
    genre_vocab = sorted({g for gs in items["genres"] for g in gs})
    genre_index = {g: i + 1 for i, g in enumerate(genre_vocab)}
    item_genres = np.empty(len(items), dtype=object)
    item_genres[:] = [np.array([genre_index[g] for g in gs], dtype=np.int64) for gs in items["genres"]]

    u_row = np.searchsorted(users["user_id"].to_numpy(), ratings["user_id"].to_numpy())
    i_row = np.searchsorted(items["item_id"].to_numpy(), ratings["item_id"].to_numpy())
    r_item = item_code[i_row]  # item code of every rating, in (user, time, item) order
    duplicated = ratings.duplicated(["user_id", "item_id"]).to_numpy()
    if duplicated.any():
        row = first_true(duplicated)
        raise DataError(ml.source, "the user rated this item twice", row=row, column="item_id")

    # ---- per-user positions and split
    r_user = u_row.astype(np.int64)
    user_start = np.searchsorted(r_user, np.arange(len(users)), side="left")
    user_count = np.searchsorted(r_user, np.arange(len(users)), side="right") - user_start
    position = np.arange(len(ratings), dtype=np.int64) - user_start[r_user]
    n = user_count[r_user]
    if cfg.leave_one_out:
        n_test = np.ones_like(n)
        n_valid = np.ones_like(n)
    else:
        n_test = np.maximum(1, np.ceil(cfg.test_fraction * n - 1e-9)).astype(np.int64)
        n_valid = np.maximum(1, np.ceil(cfg.valid_fraction * n - 1e-9)).astype(np.int64)
    split = np.zeros(len(ratings), dtype=np.int64)
    split[position >= n - n_test - n_valid] = 1
    split[position >= n - n_test] = 2
    # One past the last rating of each rating's split: future items never cross into a later split.
    user_first = user_start[r_user]
    split_end = np.where(split == 0, user_first + n - n_test - n_valid, np.where(split == 1, user_first + n - n_test,
                                                                                 user_first + n))  # fmt: skip

    # ---- negatives: uniform over items that existed at the time and that the user never rated
    timestamps = ratings["timestamp"].to_numpy(np.int64)
    first_time = np.full(n_item, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_time, r_item, timestamps)
    # Items ordered by first appearance; "existed at time t" is then a prefix of this order.
    by_first = np.lexsort((np.arange(n_item), first_time))
    by_first = by_first[first_time[by_first] < np.iinfo(np.int64).max]
    rank_of = np.full(n_item, -1, dtype=np.int64)
    rank_of[by_first] = np.arange(len(by_first))
    sorted_first = first_time[by_first]

    # Each user's rated items as sorted ranks in that order, flattened with a per-user key offset.
    rated_rank = rank_of[r_item]
    key_base = np.int64(len(by_first) + 1)
    rated_keys = np.sort(r_user * key_base + rated_rank)
    # A_j = rank_j - j (unrated items before the j-th rated one) maps the r-th unrated item to its rank.
    j_in_user = np.arange(len(rated_keys)) - user_start[rated_keys // key_base]
    gap_keys = (rated_keys // key_base) * key_base + (rated_keys % key_base - j_in_user)

    positive = position >= 1
    pos_idx = np.flatnonzero(positive)
    p_user = r_user[pos_idx]
    existing = np.searchsorted(sorted_first, timestamps[pos_idx], side="right")
    rated_before = np.searchsorted(rated_keys, p_user * key_base + existing, side="left") - user_start[p_user]
    available = existing - rated_before
    rng = np.random.default_rng(cfg.seed)
    draw = np.floor(rng.random(len(pos_idx)) * np.maximum(available, 1)).astype(np.int64)
    shift = np.searchsorted(gap_keys, p_user * key_base + draw, side="right") - user_start[p_user]
    negative_item = by_first[np.minimum(draw + shift, len(by_first) - 1)]
    has_negative = available > 0

    # ---- samples: the positive row then its negative row, per (user, position)
    frames: dict[str, pd.DataFrame] = {}
    split_counts: dict[str, dict[str, int]] = {}
    r_rating = ratings["rating"].to_numpy(np.int64)
    for split_id, split_name in enumerate(SPLITS):
        sel = pos_idx[split[pos_idx] == split_id]
        sel_neg = has_negative[split[pos_idx] == split_id]
        neg_items = negative_item[split[pos_idx] == split_id]
        group = np.repeat(np.arange(len(sel), dtype=np.int64), 1 + sel_neg.astype(np.int64))
        is_pos = np.ones(len(group), dtype=bool)
        is_pos[1:] = group[1:] != group[:-1]
        src = sel[group]  # the positive rating each row derives from
        target = r_item[src].copy()
        target[~is_pos] = neg_items[sel_neg]
        hist_start = user_start[r_user[src]] + np.maximum(0, position[src] - cfg.max_history)
        hist_end = src
        history = np.empty(len(src), dtype=object)
        history[:] = [r_item[s:e] for s, e in zip(hist_start, hist_end, strict=True)]
        future = _future_items(r_item, timestamps, src, split_end[src], cfg) if cfg.next_window else None
        rating = np.where(is_pos, r_rating[src].astype(np.float64), np.nan)
        ur = u_row[src]
        ir = np.searchsorted(item_code, target)
        frames[split_name] = pd.DataFrame(
            {
                "user_id": users["user_id"].to_numpy()[ur],
                "group_id": group,
                "timestamp": timestamps[src],
                "position": position[src],
                "item_id": items["item_id"].to_numpy()[ir],
                "watch": is_pos.astype(np.float64),
                "like": np.where(is_pos, (rating >= 4).astype(np.float64), np.nan),
                "rating": rating,
                "user": user_code[ur],
                "age": age[ur],
                "gender": gender[ur],
                "occupation": occupation[ur],
                "zip3": zip3[ur],
                "item": target,
                "genres": item_genres[ir],
                "year": year[ir],
                "history": history,
                **({"next_items": future} if future is not None else {}),
            }
        )
        split_counts[split_name] = {
            "ratings": int((split == split_id).sum()),
            "positives": len(sel),
            "negatives": int(sel_neg.sum()),
            "positives_without_negative": int((~sel_neg).sum()),
            # rows whose user had more than max_history earlier ratings: the window keeps the most recent ones
            "histories_truncated": int((position[src] > cfg.max_history).sum()),
        }

    tables = [
        {"name": "user", "num_embeddings": n_user},
        {"name": "age", "num_embeddings": len(AGE_EDGES) + 2},
        {"name": "gender", "num_embeddings": n_gender},
        {"name": "occupation", "num_embeddings": n_occupation},
        {"name": "zip3", "num_embeddings": n_zip3},
        {"name": "item", "num_embeddings": n_item},
        {"name": "genre", "num_embeddings": len(genre_vocab) + 1},
        {"name": "year", "num_embeddings": len(YEAR_EDGES) + 2},
    ]
    profile = ("user", "age", "gender", "occupation", "zip3")
    sparse: list[dict[str, object]] = [{"name": f, "column": f, "table": f, "side": "user"} for f in profile]
    sparse.append({"name": "year", "column": "year", "table": "year"})
    sparse.append({"name": "genres", "column": "genres", "table": "genre", "multi_valued": True})
    schema = Schema.from_dict(
        {
            "name": f"{ml.name}-mt",
            "user_column": "user_id",
            "group_column": "group_id",
            "timestamp_column": "timestamp",
            "tables": tables,
            "sparse_features": sparse,
            "sequence_features": [
                {"name": "history", "column": "history", "table": "item", "multi_valued": True, "per_group": True},
                {"name": "target_item", "column": "item", "table": "item"},
                *(
                    [
                        {
                            "name": "next_items",
                            "column": "next_items",
                            "table": "item",
                            "multi_valued": True,
                            "per_group": True,
                        }
                    ]
                    if cfg.next_window
                    else []
                ),
            ],
            **({"next_items": "next_items"} if cfg.next_window else {}),
            "tasks": [
                {"name": "watch", "type": "binary", "label": "watch"},
                {"name": "like", "type": "binary", "label": "like"},
                {"name": "rating", "type": "regression", "label": "rating"},
            ],
        },
        source=f"{ml.name}-mt protocol",
    )
    sequences = UserSequences(
        users=users["user_id"].to_numpy(), offsets=offsets_from_lengths(user_count.astype(np.int64)), items=r_item
    )
    return ProtocolOutput(frames=frames, schema=schema, split_counts=split_counts, sequences=sequences)


def _future_items(
    items: IntArray, timestamps: IntArray, src: IntArray, end: IntArray, cfg: DataConfig
) -> npt.NDArray[np.object_]:
    """Each sample's future items: ratings ``src .. src + next_window - 1`` of its user (``src`` is the rated item
    itself, the positive), cut at the end of the sample's split and, when ``next_horizon_days`` > 0, at that many
    days after the sample.

    Example::

        >>> from supermoe_rec.config.experiment import DataConfig
        >>> cfg = DataConfig(next_window=3, next_horizon_days=1.0)
        >>> out = _future_items(np.array([5, 6, 7, 8]), np.array([0, 10, 90_000, 90_001]), np.array([0, 2]),
        ...                     np.array([4, 3]), cfg)
        >>> [a.tolist() for a in out]  # item 7 is more than a day after item 5; the split ends before item 8
        [[5, 6], [7]]
    """
    offsets = np.arange(cfg.next_window, dtype=np.int64)
    index = src[:, None] + offsets[None, :]  # (N, W)
    keep = index < end[:, None]
    clipped = np.minimum(index, len(items) - 1)
    if cfg.next_horizon_days > 0:
        keep &= timestamps[clipped] - timestamps[src][:, None] <= cfg.next_horizon_days * 86_400
    out = np.empty(len(src), dtype=object)
    out[:] = [items[row][k] for row, k in zip(clipped, keep, strict=True)]
    return out


def split_sizes(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, valid, test) rating counts for a user with ``n`` ratings (for documentation and tests)."""
    n_test = max(1, math.ceil(test_fraction * n - 1e-9))
    n_valid = max(1, math.ceil(valid_fraction * n - 1e-9))
    return n - n_test - n_valid, n_valid, n_test
