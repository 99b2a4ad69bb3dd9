"""Tests for MultiTaskEvaluator: metrics against scikit-learn, masking, accumulation, exact multi-rank values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, roc_auc_score

from supermoe_rec.config.experiment import TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.training.metrics import MultiTaskEvaluator, group_auc, primary_metric

from .dist_utils import run_distributed

NAN = float("nan")
WATCH = TaskSpec("watch", TaskType.BINARY)
LIKE = TaskSpec("like", TaskType.BINARY)
RATING = TaskSpec("rating", TaskType.REGRESSION)
TASKS = [WATCH, LIKE, RATING]

Data = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]


def _dataset(n: int = 600, users: int = 25, seed: int = 0) -> Data:
    """Random watch/like/rating rows; scores rounded to 0.25 so ties are common; NaN labels where the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, users, (n,), generator=g)
    watch_y = (torch.rand(n, generator=g) < 0.5).float()
    like_y = (torch.rand(n, generator=g) < 0.6).float()
    rating_y = torch.randint(1, 6, (n,), generator=g).float()
    # Scores depend on the labels, so the AUCs are far from 0.5 and a wrong rank would show.
    preds = {
        "watch": torch.round((torch.randn(n, generator=g) + watch_y) * 4) / 4,
        "like": torch.round((torch.randn(n, generator=g) + like_y) * 4) / 4,
        "rating": rating_y + torch.randn(n, generator=g),
    }
    mask = torch.ones(n, 3)
    mask[:, 1] = watch_y  # like and rating are labelled on positives only, as in ml100k-mt
    mask[:, 2] = watch_y
    labels = torch.stack([watch_y, like_y, rating_y], dim=1)
    labels[mask == 0] = NAN
    return preds, labels, mask, user


def _evaluate(data: Data, tasks: list[TaskSpec] = TASKS) -> dict[str, dict[str, float]]:
    ev = MultiTaskEvaluator(tasks)
    ev.update(*data)
    return ev.compute()


def _labelled(data: Data, t: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    preds, labels, mask, user = data
    m = mask[:, t] == 1
    return preds[name][m].double().numpy(), labels[m, t].double().numpy(), user[m].numpy()


def _gauc_loop(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> tuple[float, int]:
    """The textbook definition: per-user sklearn AUC weighted by the user's rows; one-class users skipped."""
    num, den, counted = 0.0, 0.0, 0
    for u in np.unique(users):
        sel = users == u
        if len(np.unique(labels[sel])) < 2:
            continue
        num += sel.sum() * roc_auc_score(labels[sel], scores[sel])
        den += sel.sum()
        counted += 1
    return (num / den if counted else NAN), counted


def test_binary_metrics_match_sklearn() -> None:
    data = _dataset()
    got = _evaluate(data)
    for t, name in ((0, "watch"), (1, "like")):
        s, y, _ = _labelled(data, t, name)
        assert len(np.unique(s)) < len(s) / 4  # heavy ties, so tie handling is exercised
        assert got[name]["count"] == len(y)
        assert got[name]["auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
        p = 1.0 / (1.0 + np.exp(-s))
        assert got[name]["logloss"] == pytest.approx(log_loss(y, p), rel=1e-12)


def test_regression_metrics_match_sklearn() -> None:
    data = _dataset()
    got = _evaluate(data)["rating"]
    v, y, _ = _labelled(data, 2, "rating")
    assert got["count"] == len(y) < 600
    assert got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, v)), rel=1e-12)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, v), rel=1e-12)


def test_gauc_matches_per_user_sklearn_loop() -> None:
    data = _dataset(users=150)  # ~4 rows a user: some users have a single class and must be skipped
    got = _evaluate(data)
    for t, name in ((0, "watch"), (1, "like")):
        s, y, u = _labelled(data, t, name)
        want, counted = _gauc_loop(s, y, u)
        assert counted < len(np.unique(u))  # the skip rule is exercised
        assert got[name]["gauc_users"] == counted
        assert got[name]["gauc"] == pytest.approx(want, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 4), st.integers(-3, 3), st.booleans()), min_size=1, max_size=60),
)
def test_group_auc_sweep(rows: list[tuple[int, int, bool]]) -> None:
    users = np.array([r[0] for r in rows]) * 1000  # sparse, unsorted user codes
    scores = np.array([r[1] for r in rows], dtype=np.float64)  # 7 distinct values: many ties
    labels = np.array([r[2] for r in rows], dtype=np.float64)
    want, want_users = _gauc_loop(scores, labels, users)
    got, got_users = group_auc(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(users))
    assert got_users == want_users
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12)


def test_masked_rows_do_not_matter() -> None:
    preds, labels, mask, user = _dataset()
    got = _evaluate((preds, labels, mask, user))
    assert all(math.isfinite(v) for task in got.values() for v in task.values())  # NaN labels never leaked in
    # Different garbage at every masked entry (labels, predictions): identical metrics.
    garbage = {k: torch.where(mask[:, t] == 1, v, torch.full_like(v, 1e6)) for t, (k, v) in enumerate(preds.items())}
    labels2 = torch.where(mask == 1, labels, torch.full_like(labels, -7.0))
    assert _evaluate((garbage, labels2, mask, user)) == got
    # A boolean mask means the same as a 0/1 float mask.
    assert _evaluate((preds, labels, mask.bool(), user)) == got


def test_large_logits_are_not_tied_by_sigmoid() -> None:
    # float32 sigmoid maps all of these to 1.0; ranking on probabilities would give AUC 0.5 instead of 1.
    logits = torch.tensor([18.0, 20.0, 25.0, 30.0, 40.0, 50.0])
    y = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    got = _evaluate(({"watch": logits}, y[:, None], torch.ones(6, 1), torch.zeros(6, dtype=torch.int64)), [WATCH])
    assert got["watch"]["auc"] == 1.0 == roc_auc_score(y.numpy(), logits.numpy())
    # Log loss is clipped exactly like sklearn's (the true-class probability of the negatives is 1 - 1 = 0 -> eps).
    p = 1.0 / (1.0 + np.exp(-logits.double().numpy()))
    assert got["watch"]["logloss"] == pytest.approx(log_loss(y.numpy(), p), rel=1e-12)


def test_several_updates_equal_one_batch() -> None:
    preds, labels, mask, user = _dataset()
    ev = MultiTaskEvaluator(TASKS)
    for lo, hi in ((0, 1), (1, 250), (250, 251), (251, 600)):  # uneven, including single-row batches
        ev.update({k: v[lo:hi] for k, v in preds.items()}, labels[lo:hi], mask[lo:hi], user[lo:hi])
    assert ev.compute() == _evaluate((preds, labels, mask, user))
    ev.reset()
    assert ev.compute()["watch"]["count"] == 0.0


def test_degenerate_inputs_give_nan_not_errors() -> None:
    ev = MultiTaskEvaluator(TASKS)
    empty = ev.compute()  # nothing accumulated at all
    assert [empty[t.name]["count"] for t in TASKS] == [0.0, 0.0, 0.0]
    assert math.isnan(empty["watch"]["auc"]) and math.isnan(empty["rating"]["rmse"])

    # watch: one class only; like: no labelled rows; rating: labelled.
    preds = {"watch": torch.tensor([0.3, -1.0, 2.0]), "like": torch.zeros(3), "rating": torch.tensor([4.0, 2.0, 5.0])}
    labels = torch.tensor([[1.0, NAN, 4.0], [1.0, NAN, 1.0], [1.0, NAN, 5.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]] * 3)
    ev.update(preds, labels, mask, torch.tensor([0, 0, 1]))
    got = ev.compute()
    w, like = got["watch"], got["like"]
    assert w["count"] == 3.0 and math.isnan(w["auc"]) and math.isnan(w["gauc"]) and w["gauc_users"] == 0.0
    assert w["logloss"] == pytest.approx(
        log_loss([1, 1, 1], 1 / (1 + np.exp(-preds["watch"].double().numpy())), labels=[0, 1])
    )
    assert like["count"] == 0.0 and like["gauc_users"] == 0.0
    assert all(math.isnan(like[k]) for k in ("auc", "gauc", "logloss"))
    assert got["rating"]["rmse"] == pytest.approx(math.sqrt(1.0 / 3.0))


def test_nan_prediction_gives_nan_not_a_silent_rank() -> None:
    preds, labels, mask, user = _dataset()
    preds["watch"][5] = NAN  # a diverged model: sorting would silently place the NaN somewhere
    got = _evaluate((preds, labels, mask, user))["watch"]
    assert math.isnan(got["auc"]) and math.isnan(got["gauc"]) and math.isnan(got["logloss"])


def test_bad_inputs_raise() -> None:
    ev = MultiTaskEvaluator([WATCH])
    one = torch.ones(2, 1)
    with pytest.raises(KeyError, match="watch"):
        ev.update({"ctr": torch.zeros(2)}, one, one, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="0 or 1"):
        ev.update({"watch": torch.zeros(2)}, torch.tensor([[1.0], [0.5]]), one, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="unique"):
        MultiTaskEvaluator([WATCH, WATCH])


def test_primary_metric() -> None:
    assert primary_metric(WATCH) == ("auc", True)
    assert primary_metric(RATING) == ("rmse", False)


# Rank 0 gets 430 rows, rank 1 the last 170; like/rating rows of rank 1 are all dropped, so rank 1 has none of them.
_SPLIT = 430


def _rank_data(rank: int) -> Data:
    preds, labels, mask, user = _dataset()
    # Rank 1's scores are shifted down: each rank's own AUC is unchanged, but pooled rows now interleave differently,
    # so a mean of per-rank AUCs differs from the AUC of the union.
    preds = {k: v - 1.5 * (torch.arange(len(v)) >= _SPLIT) for k, v in preds.items()}
    mask = mask.clone()
    mask[_SPLIT:, 1:] = 0
    sl = slice(0, _SPLIT) if rank == 0 else slice(_SPLIT, None)
    return {k: v[sl] for k, v in preds.items()}, labels[sl], mask[sl], user[sl]


def _dist_compute(rank: int, world_size: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    ev = MultiTaskEvaluator(TASKS)
    ev.update(*_rank_data(rank))
    pair = dist.new_group([0, 1])
    return ev.compute(), ev.compute(process_group=pair)  # default group, then an explicit one


def test_two_ranks_get_the_exact_union_metrics() -> None:
    whole = [_rank_data(0), _rank_data(1)]
    single = MultiTaskEvaluator(TASKS)
    for d in whole:
        single.update(*d)
    want = single.compute()
    results = run_distributed(_dist_compute, 2)
    for default_group, explicit_group in results:
        assert default_group == want
        assert explicit_group == want
    assert want["rating"]["count"] == _rank_data(0)[2][:, 2].sum().item()  # rank 1 contributed no rating rows
    # The naive mean of per-rank AUCs is not the AUC of the union, so averaging would have failed above.
    per_rank = []
    for d in whole:
        s, y, _ = _labelled(d, 0, "watch")
        per_rank.append(roc_auc_score(y, s))
    assert abs(sum(per_rank) / 2 - want["watch"]["auc"]) > 0.02
