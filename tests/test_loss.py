"""Tests for TaskIndicatorLoss: exact values, masking, uncertainty weighting and multi-process normalisation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from supermoe_rec.config.experiment import RegressionLoss, TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.objectives.task_indicator import TaskIndicatorLoss

NAN = float("nan")
CTR = TaskSpec("ctr", TaskType.BINARY)
RATING = TaskSpec("rating", TaskType.REGRESSION)


def _tiny_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """3 samples; ctr labelled on samples 0, 1 and rating on samples 0, 2; unlabelled entries are NaN."""
    logits = {"ctr": torch.tensor([0.0, 2.0, -1.0]), "rating": torch.tensor([3.0, 4.5, 4.0])}
    labels = torch.tensor([[1.0, 4.0], [0.0, NAN], [NAN, 1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 1]])
    return logits, labels, mask


def test_hand_computed_value() -> None:
    logits, labels, mask = _tiny_batch()
    loss_fn = TaskIndicatorLoss([CTR, RATING], task_weights={"ctr": 2.0}, balance_loss_weight=0.01, z_loss_weight=0.1)
    out = loss_fn(logits, labels, mask, balance_loss=torch.tensor(0.5), z_loss=torch.tensor(2.0))
    # ctr:    BCE(0, y=1) = ln 2 = 0.693147;  BCE(2, y=0) = ln(1 + e^2) = 2.126928;  mean over 2 = 1.410038
    # rating: (3 - 4)^2 = 1;  (4 - 1)^2 = 9;  mean over 2 = 5.0
    # total:  2 * 1.410038 + 5.0 + 0.01 * 0.5 + 0.1 * 2.0 = 8.025075
    ctr = (math.log(2.0) + math.log1p(math.exp(2.0))) / 2
    assert out.per_task["ctr"].item() == pytest.approx(1.410038, abs=1e-6)
    assert out.per_task["ctr"].item() == pytest.approx(ctr, abs=1e-6)
    assert out.per_task["rating"].item() == 5.0
    assert out.total.item() == pytest.approx(8.025075, abs=1e-5)
    assert out.total.item() == pytest.approx(2 * ctr + 5.0 + 0.005 + 0.2, abs=1e-5)
    assert out.labelled["ctr"].item() == 2 and out.labelled["rating"].item() == 2
    assert out.balance_loss.item() == 0.5 and out.z_loss.item() == 2.0
    assert not out.per_task["ctr"].requires_grad
    # A boolean mask is the same mask.
    out_bool = loss_fn(logits, labels, mask.bool(), balance_loss=torch.tensor(0.5), z_loss=torch.tensor(2.0))
    assert torch.equal(out_bool.total, out.total)


def test_hand_computed_huber() -> None:
    logits, labels, mask = _tiny_batch()
    loss_fn = TaskIndicatorLoss([CTR, RATING], regression_loss=RegressionLoss.HUBER, huber_delta=1.0)
    out = loss_fn(logits, labels, mask)
    # |3 - 4| = 1 <= delta: 0.5 * 1^2 = 0.5;  |4 - 1| = 3 > delta: delta * (3 - 0.5 * delta) = 2.5;  mean = 1.5
    assert out.per_task["rating"].item() == 1.5
    assert out.total.item() == pytest.approx(1.410038 + 1.5, abs=1e-6)


def test_masked_samples_give_exactly_zero_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    mask = torch.tensor([[1], [0], [1], [0], [1], [0]])
    labelled = mask[:, 0].bool()
    labels = torch.tensor([[1.0], [NAN], [0.0], [NAN], [1.0], [NAN]])
    seen, unseen = nn.Linear(4, 1), nn.Linear(4, 1)
    # Labelled rows go through one tower, masked rows through the other: `unseen` only ever sees masked samples.
    logits = torch.zeros(6)
    logits = logits.index_put((labelled,), seen(x[labelled]).squeeze(-1))
    logits = logits.index_put((~labelled,), unseen(x[~labelled]).squeeze(-1))
    logits.retain_grad()
    out = TaskIndicatorLoss([CTR])({"ctr": logits}, labels, mask)
    out.total.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad[~labelled], torch.zeros(3))
    assert bool((logits.grad[labelled] != 0).all())
    assert unseen.weight.grad is not None and unseen.bias.grad is not None
    assert torch.equal(unseen.weight.grad, torch.zeros_like(unseen.weight))
    assert torch.equal(unseen.bias.grad, torch.zeros_like(unseen.bias))
    assert seen.weight.grad is not None and bool((seen.weight.grad != 0).any())


def test_nan_labels_and_logits_under_mask_are_harmless() -> None:
    logits, labels, mask = _tiny_batch()
    loss_fn = TaskIndicatorLoss([CTR, RATING])
    clean = loss_fn(logits, torch.nan_to_num(labels, nan=123.0), mask)
    dirty_logits = {
        "ctr": torch.tensor([0.0, 2.0, NAN], requires_grad=True),
        "rating": torch.tensor([3.0, math.inf, 4.0], requires_grad=True),
    }
    dirty = loss_fn(dirty_logits, labels, mask)
    assert torch.equal(dirty.total, clean.total)
    dirty.total.backward()
    for name, masked_index in (("ctr", 2), ("rating", 1)):
        grad = dirty_logits[name].grad
        assert grad is not None and bool(torch.isfinite(grad).all())
        assert grad[masked_index].item() == 0.0


def test_task_without_labels_contributes_exactly_zero() -> None:
    logits, labels, _ = _tiny_batch()
    mask = torch.tensor([[1, 0], [1, 0], [0, 0]])
    labels = labels.clone()
    labels[:, 1] = NAN
    rating_logits = logits["rating"].clone().requires_grad_(True)
    loss_fn = TaskIndicatorLoss([CTR, RATING], uncertainty_weighting=True)
    with torch.no_grad():
        assert loss_fn.log_vars is not None
        loss_fn.log_vars.copy_(torch.tensor([0.0, 0.7]))
    out = loss_fn({"ctr": logits["ctr"], "rating": rating_logits}, labels, mask)
    assert out.per_task["rating"].item() == 0.0
    assert out.labelled["rating"].item() == 0
    # Only ctr remains, and rating's 0.5 * s regulariser is gone too: exp(-0) * 1.410038 + 0.5 * 0.
    assert out.total.item() == pytest.approx(1.410038, abs=1e-6)
    out.total.backward()
    assert rating_logits.grad is not None and torch.equal(rating_logits.grad, torch.zeros(3))
    assert loss_fn.log_vars.grad is not None and loss_fn.log_vars.grad[1].item() == 0.0


def test_uncertainty_weighting_value_and_gradient() -> None:
    logits, labels, mask = _tiny_batch()
    loss_fn = TaskIndicatorLoss([CTR, RATING], task_weights={"rating": 2.0}, uncertainty_weighting=True)
    assert loss_fn.log_vars is not None
    assert any(p is loss_fn.log_vars for p in loss_fn.parameters())  # an optimiser over parameters() sees it
    s_ctr, s_rating = 0.4, -0.3
    with torch.no_grad():
        loss_fn.log_vars.copy_(torch.tensor([s_ctr, s_rating]))
    out = loss_fn(logits, labels, mask)
    l_ctr, l_rating = 1.410037595801459, 5.0
    expected = math.exp(-s_ctr) * l_ctr + 0.5 * s_ctr + 2.0 * (0.5 * math.exp(-s_rating) * l_rating + 0.5 * s_rating)
    assert out.total.item() == pytest.approx(expected, abs=1e-5)
    out.total.backward()
    grad = loss_fn.log_vars.grad
    assert grad is not None
    assert grad[0].item() == pytest.approx(-math.exp(-s_ctr) * l_ctr + 0.5, abs=1e-5)
    assert grad[1].item() == pytest.approx(2.0 * (-0.5 * math.exp(-s_rating) * l_rating + 0.5), abs=1e-5)


def test_meta_construction_and_reset() -> None:
    loss_fn = TaskIndicatorLoss([CTR, RATING], uncertainty_weighting=True, device=torch.device("meta"))
    assert loss_fn.log_vars is not None and loss_fn.log_vars.is_meta
    loss_fn.to_empty(device="cpu")
    loss_fn.reset_parameters()
    assert loss_fn.log_vars is not None and torch.equal(loss_fn.log_vars.data, torch.zeros(2))


def test_unknown_task_weight_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['clik'\] \(known: ctr, rating\)"):
        TaskIndicatorLoss([CTR, RATING], task_weights={"clik": 1.0})
    with pytest.raises(ValueError, match=r"task_weights\.ctr"):
        TaskIndicatorLoss([CTR, RATING], task_weights={"ctr": -1.0})


def test_bad_inputs_are_errors() -> None:
    logits, labels, mask = _tiny_batch()
    loss_fn = TaskIndicatorLoss([CTR, RATING])
    with pytest.raises(ValueError, match=r"missing \['rating'\]"):
        loss_fn({"ctr": logits["ctr"]}, labels, mask)
    with pytest.raises(ValueError, match="labels must be"):
        loss_fn(logits, labels[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="task_mask"):
        loss_fn(logits, labels, mask[:2])
    with pytest.raises(ValueError, match=r"logits\['ctr'\]"):
        loss_fn({"ctr": logits["ctr"][:2], "rating": logits["rating"]}, labels, mask)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 12),
    types=st.lists(st.sampled_from([TaskType.BINARY, TaskType.REGRESSION]), min_size=1, max_size=3),
    huber=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_boolean_indexing_reference(batch: int, types: list[TaskType], huber: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tasks = [TaskSpec(f"t{i}", ty) for i, ty in enumerate(types)]
    weights = {t.name: float(i + 1) for i, t in enumerate(tasks)}
    mask = torch.rand(batch, len(tasks), generator=g) < 0.5  # all-unlabelled columns happen
    labels = torch.where(
        torch.tensor([ty is TaskType.BINARY for ty in types]),
        (torch.rand(batch, len(tasks), generator=g) < 0.5).double(),
        torch.randn(batch, len(tasks), generator=g, dtype=torch.float64) * 2,
    )
    labels = labels.masked_fill(~mask, NAN)
    logits = {t.name: torch.randn(batch, generator=g, dtype=torch.float64) * 3 for t in tasks}
    reg = RegressionLoss.HUBER if huber else RegressionLoss.MSE
    out = TaskIndicatorLoss(tasks, task_weights=weights, regression_loss=reg, huber_delta=0.7)(logits, labels, mask)

    expected = torch.zeros((), dtype=torch.float64)
    for i, task in enumerate(tasks):
        m = mask[:, i]
        if not bool(m.any()):
            continue
        pred, y = logits[task.name][m], labels[m, i]
        if task.type is TaskType.BINARY:
            task_loss = F.binary_cross_entropy_with_logits(pred, y)
        elif huber:
            task_loss = F.huber_loss(pred, y, delta=0.7)
        else:
            task_loss = F.mse_loss(pred, y)
        torch.testing.assert_close(out.per_task[task.name], task_loss, rtol=1e-12, atol=1e-12)
        expected = expected + weights[task.name] * task_loss
    torch.testing.assert_close(out.total, expected, rtol=1e-12, atol=1e-12)


# --- multi-process: global normalisation -------------------------------------------------------------------------

DIST_TASKS = [
    TaskSpec("ctr", TaskType.BINARY),
    TaskSpec("like", TaskType.BINARY),
    TaskSpec("rating", TaskType.REGRESSION),
]


class _TinyModel(nn.Module):
    """A shared linear layer producing one logit per task, and the loss (so DDP averages ``log_vars`` grads too)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.loss = TaskIndicatorLoss(
            DIST_TASKS, task_weights={"like": 3.0}, uncertainty_weighting=True, global_normalization=True
        )
        with torch.no_grad():
            assert self.loss.log_vars is not None
            self.loss.log_vars.copy_(torch.tensor([0.3, -0.2, 0.5]))

    def forward(self, x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)  # (B, T)
        logits = {t.name: out[:, i] for i, t in enumerate(DIST_TASKS)}
        return self.loss(logits, labels, mask).total


def _dist_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 samples; rank 0 gets rows 0-3 and rank 1 rows 4-7. Labels fall unevenly: like is labelled 3 times on
    rank 0 and once on rank 1; rating only on rank 0 (rank 1 has none)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, generator=g)
    mask = torch.tensor(
        [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool
    )
    labels = torch.stack(
        [
            (torch.rand(8, generator=g) < 0.5).float(),
            (torch.rand(8, generator=g) < 0.5).float(),
            torch.randint(1, 6, (8,), generator=g).float(),
        ],
        dim=1,
    )
    return x, labels.masked_fill(~mask, NAN), mask


def _dist_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = _TinyModel()
        ddp = DistributedDataParallel(model)
        x, labels, mask = _dist_batch()
        rows = slice(rank * 4, rank * 4 + 4)
        total = ddp(x[rows], labels[rows], mask[rows])
        total.backward()
        # The explicit process_group argument, and the naive per-rank loss for contrast.
        logits = {t.name: model.linear(x[rows])[:, i].detach() for i, t in enumerate(DIST_TASKS)}
        explicit = model.loss(logits, labels[rows], mask[rows], process_group=dist.group.WORLD)
        plain = TaskIndicatorLoss(DIST_TASKS, task_weights={"like": 3.0}, uncertainty_weighting=True)
        with torch.no_grad():
            assert plain.log_vars is not None and model.loss.log_vars is not None
            plain.log_vars.copy_(model.loss.log_vars)
        naive = plain(logits, labels[rows], mask[rows])
        torch.save(
            {
                "total": total.detach(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "explicit_total": explicit.total.detach(),
                "per_task": explicit.per_task,
                "labelled": explicit.labelled,
                "naive_total": naive.total.detach(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_matches_single_process(tmp_path: Path) -> None:
    world_size = 2
    mp.spawn(_dist_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    model = _TinyModel()  # same seed and log_vars as on the ranks; torch.distributed is not initialised here
    x, labels, mask = _dist_batch()
    full = model(x, labels, mask)
    full.backward()
    full_per_task = model.loss(
        {t.name: model.linear(x)[:, i].detach() for i, t in enumerate(DIST_TASKS)}, labels, mask
    ).per_task

    mean_total = sum(r["total"] for r in ranks) / world_size
    assert abs(mean_total.item() - full.item()) < 1e-6
    assert abs((sum(r["explicit_total"] for r in ranks) / world_size).item() - full.item()) < 1e-6
    for name, p in model.named_parameters():
        assert p.grad is not None
        for r in ranks:  # DDP averaged gradients: identical on every rank, equal to the full-batch gradient
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=0, atol=1e-6)
    for t in DIST_TASKS:
        mean_task = sum(r["per_task"][t.name] for r in ranks) / world_size
        assert abs(mean_task.item() - full_per_task[t.name].item()) < 1e-6
        assert sum(int(r["labelled"][t.name]) for r in ranks) == int(mask[:, DIST_TASKS.index(t)].sum())
    assert [int(r["labelled"]["rating"]) for r in ranks] == [2, 0]
    # Per-rank means would be wrong here: that is what the global counts fix.
    naive_mean = sum(r["naive_total"] for r in ranks) / world_size
    assert abs(naive_mean.item() - full.item()) > 1e-2
