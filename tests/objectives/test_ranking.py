"""The one next-item ranking (supermoe_rec.objectives.ranking) against hand-computed rankings, ties included.

The rule under test: rank = 1 + the candidates scoring above the target + the tied candidates with a smaller id;
excluded candidates count for nothing; rank 0 where the target is not among the candidates. ``top_k`` lists the
same order, so a target at rank r is the r-th item of its top-k list.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from supermoe_rec.models.supermoe import NextItemsInputs
from supermoe_rec.models.train_module import catalogue_rank
from supermoe_rec.objectives.ranking import (
    NO_RANK,
    metrics_from_sums,
    rank_metric_sums,
    rank_metrics,
    target_ranks,
    top_k,
)

# Columns 0..5. Row 0: columns 1, 3 and 4 tie at 0.5 under column 2's 0.9.
SCORES = torch.tensor(
    [
        [0.1, 0.5, 0.9, 0.5, 0.5, 0.0],
        [0.1, 0.5, 0.9, 0.5, 0.5, 0.0],
        [0.1, 0.5, 0.9, 0.5, 0.5, 0.0],
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # every candidate tied
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
    ]
)


def test_target_ranks_by_hand() -> None:
    targets = torch.tensor([1, 3, 4, 0, 5])
    # Row 0, target 1: 0.9 above, no tied smaller column -> 2. Target 3: 0.9 above, column 1 tied and smaller -> 3.
    # Target 4: 0.9, then columns 1 and 3 -> 4. All tied: column 0 is first (1), column 5 last (6).
    assert target_ranks(SCORES, targets).tolist() == [2, 3, 4, 1, 6]
    # Neither optimistic (above + 1: [2, 2, 2, 1, 1]) nor pessimistic (above + tied: [4, 4, 4, 6, 6]).
    assert target_ranks(SCORES, targets).tolist() != [2, 2, 2, 1, 1]


def test_target_ranks_with_ids_exclusions_and_absent_targets() -> None:
    ids = torch.tensor([10, 11, 12, 13, 14, 15])  # the candidates' item ids: the tie order follows them
    targets = torch.tensor([13, 14, 99, 15, 12])
    exclude = torch.zeros_like(SCORES, dtype=torch.bool)
    exclude[0, 2] = True  # row 0 saw item 12 (the 0.9): removed, target 13 moves up to behind 11 only
    exclude[1, [1, 3]] = True  # row 1: both smaller ties removed -> behind 12 only
    exclude[3, :5] = True  # row 3: everyone else removed -> first
    exclude[4, 2] = True  # row 4: the target itself is excluded -> no rank
    got = target_ranks(SCORES, targets, ids, exclude)
    assert got.tolist() == [2, 2, NO_RANK, 1, NO_RANK]


def test_a_target_in_several_columns_takes_its_best_score() -> None:
    scores = torch.tensor([[0.2, 0.8, 0.5, 0.9]])
    assert target_ranks(scores, torch.tensor([7]), torch.tensor([7, 3, 7, 4])).tolist() == [3]  # 0.9, 0.8, then 0.5


def test_top_k_by_hand() -> None:
    values, columns = top_k(SCORES[:1], 3)
    assert columns.tolist() == [[2, 1, 3]]  # the three-way tie at the boundary keeps the smaller columns
    assert values[0].tolist() == pytest.approx([0.9, 0.5, 0.5])
    _, columns = top_k(SCORES[3:4], 4)
    assert columns.tolist() == [[0, 1, 2, 3]]
    exclude = torch.ones(1, 6, dtype=torch.bool)
    exclude[0, [4, 5]] = False  # two candidates left for k = 3: padded with -1 / -inf
    values, columns = top_k(SCORES[:1], 3, exclude)
    assert columns.tolist() == [[4, 5, -1]]
    assert values[0, 2] == float("-inf")
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k(SCORES, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_lists_the_order_that_target_ranks_counts(seed: int) -> None:
    """On scores with many ties and random exclusions: top_k is the stable descending sort, and its r-th item has
    rank r."""
    gen = torch.Generator().manual_seed(seed)
    B, N, k = 7, 40, 12
    scores = torch.randint(0, 5, (B, N), generator=gen).float()
    exclude = torch.rand(B, N, generator=gen) < 0.3
    values, columns = top_k(scores, k, exclude)
    for b in range(B):
        row = scores[b].numpy().copy()
        row[exclude[b].numpy()] = -np.inf
        allowed = np.flatnonzero(~exclude[b].numpy())
        want = allowed[np.argsort(-row[allowed], kind="stable")][:k]
        assert columns[b, : len(want)].tolist() == want.tolist()
        ranks = target_ranks(scores[b : b + 1].expand(len(want), N), torch.from_numpy(want), exclude=exclude[b : b + 1])
        assert ranks.tolist() == list(range(1, len(want) + 1))
        assert values[b, : len(want)].tolist() == row[want].tolist()


def test_training_ranks_the_catalogue_by_the_same_rule() -> None:
    # Two users, candidates = items 1..3 (embedded as rows). User 0's query ties items 1 and 3, and its target is 3.
    ni = NextItemsInputs(
        torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        torch.zeros(2, 1, 2),
        torch.tensor([[3], [2]]),
        torch.tensor([[1.0], [0.0]]),  # user 1 has no future item
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        torch.tensor([1, 2, 3]),
    )
    assert catalogue_rank(ni).tolist() == [2, NO_RANK]  # item 1 wins the tie with item 3


def test_rank_metrics_by_hand() -> None:
    # Ranks 1, 2, 10, 11 (and a row without a rank, ignored): hits are the first three.
    got = rank_metrics(torch.tensor([1, 2, 10, 11, NO_RANK]))
    assert got["hr@10"] == pytest.approx(3 / 4)
    assert got["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(3) + 1 / math.log2(11) + 0.0) / 4)
    assert got["mrr@10"] == pytest.approx((1.0 + 1 / 2 + 1 / 10 + 0.0) / 4)
    assert rank_metrics(torch.tensor([5]), k=4) == {"hr@4": 0.0, "ndcg@4": 0.0, "mrr@4": 0.0}
    # Sums add across batches (and processes) to the metrics of all ranks at once.
    total = rank_metric_sums(torch.tensor([1, 2]), 10) + rank_metric_sums(torch.tensor([10, 11, NO_RANK]), 10)
    assert total[0] == 4
    assert metrics_from_sums(total, 10) == pytest.approx(got)
