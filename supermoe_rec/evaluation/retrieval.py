"""Next-item retrieval with a user vector against the item table, under RecBole's sequential protocol on ml-100k.

Dimension letters: U users, V item-table rows (row 0 is the "unknown" row of the protocol's codes), M model dim,
D item-table width, L input length (≤ ``max_len``).

**The protocol** (RecBole 1.2.1 ``eval_args: {split: {LS: valid_and_test}, order: TO, group_by: user, mode: full}``
on its ``ml-100k`` atomic files, which are the GroupLens ratings in ``u.data``'s order):

1. Every rating is a positive (no threshold, no k-core filter): 100,000 interactions, 943 users, 1,682 items.
2. Each user's interactions are sorted by timestamp with a **stable** sort: equal timestamps keep the order of the
   ratings file (:class:`supermoe_rec.data.movielens.MovieLens` frames keep file order; :func:`user_sequences`
   sorts by (user, timestamp, file row)).
3. Per user, the second-to-last interaction is the **valid** target and the last the **test** target; the input is
   the up-to-``max_len`` (50) items before the target, so the test input includes the valid item.
4. Full ranking over all 1,682 items. Scored twice: **unmasked** (RecBole's sequential models: ``repeatable=True``,
   seen items stay rankable; compare these with RecBole's SASRec / GRU4Rec), and **masked** (every item the user
   rated before the target is excluded, as RecBole does for general models such as Pop). On ml-100k a target is
   never a seen item, so masking only removes competitors.
5. HR@10 (= Recall@10 with one target), NDCG@10 = 1 / log2(rank + 1) when rank ≤ 10, MRR@10 = 1 / rank when
   rank ≤ 10 (rank 1 = best); each averaged over users
   (:func:`supermoe_rec.objectives.ranking.rank_metrics`).
6. **Ties**: an item scoring exactly the target's score ranks ahead of it when its item code is smaller (a stable
   descending sort by code): the one rule of :mod:`supermoe_rec.objectives.ranking`, which training's evaluation and
   serving's top-k use too. RecBole ranks with ``torch.topk`` over its own item ids (first appearance in the file),
   whose tie order differs; this only matters for models with tied scores (popularity).

**Popularity** scores an item by its number of training interactions, i.e. every interaction except each user's
last two (RecBole's Pop on the same split). Measured here on the test targets: unmasked HR@10 0.0498, NDCG@10
0.0224, MRR@10 0.0142; masked 0.0859 / 0.0449 / 0.0326. RecBole 1.2.1's Pop gives 0.0498 / 0.0226 / 0.0143 and
0.0859 / 0.0444 / 0.0319: the same hits, with equally popular items ordered differently (its ``torch.topk`` over its
own ids). Its figures lie between those of the target losing every tie and winning every tie
(``tests/test_universal.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from supermoe_rec.data.jagged import IntArray, concat_ranges, offsets_from_lengths
from supermoe_rec.objectives.ranking import rank_metrics, target_ranks

FloatArray = npt.NDArray[np.float64]
SPLITS = ("valid", "test")
# Targets per user at the end of the sequence: valid is the second-to-last, test the last.
_FROM_END = {"valid": 2, "test": 1}
K = 10
MAX_LEN = 50

__all__ = [
    "MAX_LEN",
    "K",
    "UserSequences",
    "popularity_scores",
    "ranks",
    "score_and_rank",
    "seen_mask",
    "user_sequences",
]


@dataclass(frozen=True)
class UserSequences:
    """Each user's items in time order (stable: equal timestamps keep file order), as a jagged column of codes.

    Attributes:
        users: [U] user ids, ascending.
        values: flat item codes (user after user, in time order).
        offsets: [U + 1] user u holds ``values[offsets[u]:offsets[u + 1]]``.
    """

    users: npt.NDArray[np.int64]
    values: IntArray
    offsets: IntArray

    @property
    def lengths(self) -> IntArray:
        return np.diff(self.offsets)

    def target(self, split: str) -> IntArray:
        """[U] the valid (second-to-last) or test (last) item code of every user."""
        return self.values[self.offsets[1:] - _FROM_END[split]]

    def _before(self, split: str, max_len: int | None) -> tuple[IntArray, IntArray]:
        end = self.offsets[1:] - _FROM_END[split]  # (U,) exclusive end: the target's position
        start = self.offsets[:-1] if max_len is None else np.maximum(self.offsets[:-1], end - max_len)
        lengths = end - start
        return self.values[concat_ranges(start, lengths)], offsets_from_lengths(lengths)

    def inputs(self, split: str, max_len: int = MAX_LEN) -> tuple[IntArray, IntArray]:
        """(values, offsets [U + 1]) of the up-to-``max_len`` items before each user's ``split`` target."""
        return self._before(split, max_len)

    def seen(self, split: str) -> tuple[IntArray, IntArray]:
        """(values, offsets [U + 1]) of every item the user rated before the ``split`` target (what masking hides)."""
        return self._before(split, None)

    def train_items(self) -> IntArray:
        """Codes of every training interaction: all but each user's last two."""
        return self.seen("valid")[0]


def user_sequences(ratings: pd.DataFrame, item_ids: npt.ArrayLike | None = None) -> UserSequences:
    """Sort ``ratings`` (user_id, item_id, timestamp; rows in file order) into per-user time-ordered sequences.

    Args:
        ratings: one row per interaction, in the ratings file's order (the tie-break of equal timestamps).
        item_ids: the item table's ids; an item's code is 1 + its rank among them (the ml-mt protocol's codes, so
            code c is row c of the trained item table). Default: the ids that occur in ``ratings``.

    Raises:
        ValueError: a user has fewer than 3 interactions (no train item before the valid target), or an item is
            missing from ``item_ids``.
    """
    user = ratings["user_id"].to_numpy(np.int64)
    item = ratings["item_id"].to_numpy(np.int64)
    time = ratings["timestamp"].to_numpy(np.int64)
    order = np.lexsort((np.arange(len(user)), time, user))  # by user, then timestamp, then file row: stable
    vocab = np.unique(item) if item_ids is None else np.sort(np.asarray(item_ids, dtype=np.int64))
    code = np.searchsorted(vocab, item[order])
    if (code >= len(vocab)).any() or (vocab[np.minimum(code, len(vocab) - 1)] != item[order]).any():
        raise ValueError("ratings hold an item id that is not in the item table")
    users, counts = np.unique(user[order], return_counts=True)
    if (counts < 3).any():
        raise ValueError(f"user {users[np.argmax(counts < 3)]} has < 3 interactions: no leave-one-out split")
    return UserSequences(users, (code + 1).astype(np.int64), offsets_from_lengths(counts.astype(np.int64)))


# ------------------------------------------------------------------------------------------------------ scoring


def popularity_scores(seqs: UserSequences, num_rows: int) -> FloatArray:
    """[V] training-interaction count of every item code (row 0, the unknown code, is never rankable)."""
    counts = np.bincount(seqs.train_items(), minlength=num_rows).astype(np.float64)
    counts[0] = -np.inf
    return counts


def seen_mask(values: IntArray, offsets: IntArray, num_rows: int) -> npt.NDArray[np.bool_]:
    """[U, V] True where user u rated item code v before the target (from :meth:`UserSequences.seen`)."""
    mask = np.zeros((len(offsets) - 1, num_rows), dtype=bool)
    mask[np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), values] = True
    return mask


def ranks(scores: FloatArray, targets: IntArray, mask: npt.NDArray[np.bool_] | None = None) -> IntArray:
    """1-based rank of each user's target among all item codes, by
    :func:`supermoe_rec.objectives.ranking.target_ranks` (rank 1 = best; ties: the smaller code first).

    Args:
        scores: [U, V] scores; column 0 (unknown code) is never ranked.
        targets: [U] target item codes (≥ 1).
        mask: [U, V] items excluded from the ranking (never the target), or None.

    Returns:
        [U] ranks: 1 + the items scoring above the target + the tied items with a smaller code.

    Example::

        >>> ranks(np.array([[0.0, 0.5, 0.9, 0.5, 0.1]]), np.array([3])).tolist()
        [3]
    """
    rows = np.arange(len(targets))
    exclude = np.zeros(np.shape(scores), dtype=bool) if mask is None else np.array(mask, dtype=bool)
    if mask is not None and exclude[rows, targets].any():
        raise ValueError("a target is masked: the mask must hold only items seen before the target")
    exclude[:, 0] = True
    rank = target_ranks(
        torch.from_numpy(np.array(scores, dtype=np.float64)),  # a copy: scores may be a read-only broadcast
        torch.as_tensor(np.asarray(targets, dtype=np.int64)),
        exclude=torch.from_numpy(exclude),
    )
    out: IntArray = rank.numpy().astype(np.int64)
    return out


def score_and_rank(seqs: UserSequences, split: str, scores: FloatArray, k: int = K) -> Mapping[str, dict[str, float]]:
    """Unmasked and masked metrics of [U, V] (or a broadcastable [V]) ``scores`` on the ``split`` targets.

    Returns:
        ``{"unmasked": {hr@k, ndcg@k, mrr@k}, "masked": {...}}``.
    """
    targets = seqs.target(split)
    full = np.broadcast_to(np.asarray(scores, dtype=np.float64), (len(targets), np.shape(scores)[-1]))
    mask = seen_mask(*seqs.seen(split), full.shape[1])
    return {
        "unmasked": rank_metrics(torch.from_numpy(ranks(full, targets)), k),
        "masked": rank_metrics(torch.from_numpy(ranks(full, targets, mask)), k),
    }
