"""The next-items loss against references: the exact softmax, the sampled estimate, and rank splits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from supermoe_rec.objectives.next_items import NextItemsLoss, Softmax, full_catalogue, sample_uniform
from tests.dist_utils import run_distributed

N_ITEMS, D = 41, 8


def _inputs(seed: int, groups: int = 6, window: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N_ITEMS, D, generator=g)
    query = torch.randn(groups, D, generator=g)
    pos_ids = torch.randint(1, N_ITEMS, (groups, window), generator=g)
    pos_mask = (torch.rand(groups, window, generator=g) < 0.7).float()
    pos_mask[:, 0] = 1.0
    return {"table": table, "query": query, "pos_ids": pos_ids, "pos_mask": pos_mask}


def _call(loss_fn: NextItemsLoss, x: dict[str, torch.Tensor], cand_ids: torch.Tensor) -> torch.Tensor:
    table = x["table"]
    return loss_fn(x["query"], table[x["pos_ids"]], x["pos_ids"], x["pos_mask"], table[cand_ids], cand_ids)


def _reference_full(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per positive: cross-entropy over the catalogue with the user's *other* future items left out."""
    logits = x["query"] @ x["table"].T  # (G, N)
    logits[:, 0] = float("-inf")  # padding row
    terms = []
    for g in range(len(logits)):
        own = {int(i) for i, m in zip(x["pos_ids"][g], x["pos_mask"][g], strict=True) if m}
        for p, m in zip(x["pos_ids"][g].tolist(), x["pos_mask"][g].tolist(), strict=True):
            if not m:
                continue
            row = logits[g].clone()
            row[[i for i in own if i != p]] = float("-inf")
            terms.append(F.cross_entropy(row[None], torch.tensor([p])))
    return torch.stack(terms).mean()


def test_full_softmax_matches_cross_entropy_with_one_future_item() -> None:
    x = _inputs(0, window=1)
    loss = _call(NextItemsLoss(Softmax.FULL, N_ITEMS), x, full_catalogue(N_ITEMS))
    expected = F.cross_entropy(
        torch.cat([torch.full((6, 1), float("-inf")), (x["query"] @ x["table"].T)[:, 1:]], dim=1), x["pos_ids"][:, 0]
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_the_catalogue_cross_entropy_path_equals_the_general_path() -> None:
    """One positive per query over the catalogue in id order takes the fused cross-entropy; a permuted catalogue
    (the same candidates) takes the general path: equal loss, equal gradients on the query and on the table."""
    x = _inputs(7, groups=9, window=1)
    loss_fn = NextItemsLoss(Softmax.FULL, N_ITEMS)
    results = []
    for cand_ids in (full_catalogue(N_ITEMS), full_catalogue(N_ITEMS).flip(0)):
        table = x["table"].clone().requires_grad_(True)
        query = x["query"].clone().requires_grad_(True)
        assert loss_fn._is_catalogue(cand_ids) == bool(cand_ids[0] == 1)
        loss = loss_fn(query, table[x["pos_ids"]], x["pos_ids"], x["pos_mask"], table[cand_ids], cand_ids)
        loss.backward()
        results.append((loss.detach(), query.grad, table.grad))
    (l_fast, q_fast, t_fast), (l_ref, q_ref, t_ref) = results
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q_fast, q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_fast, t_ref, rtol=1e-5, atol=1e-6)


def test_full_softmax_leaves_the_users_other_future_items_out() -> None:
    x = _inputs(1)
    x["pos_ids"][0] = torch.tensor([5, 6, 7])  # distinct, so the reference's set logic is exact
    x["pos_mask"][0] = 1.0
    loss = _call(NextItemsLoss(Softmax.FULL, N_ITEMS), x, full_catalogue(N_ITEMS))
    torch.testing.assert_close(loss, _reference_full(x), rtol=1e-5, atol=1e-6)


def test_gradient_reaches_query_and_item_rows() -> None:
    x = _inputs(2)
    x["query"].requires_grad_(True)
    x["table"].requires_grad_(True)
    _call(NextItemsLoss(Softmax.FULL, N_ITEMS), x, full_catalogue(N_ITEMS)).backward()
    assert x["query"].grad is not None and x["query"].grad.abs().min() > 0
    assert x["table"].grad is not None and x["table"].grad[0].abs().sum() == 0  # padding row is never scored


def test_sampled_softmax_approaches_full_softmax_as_samples_cover_the_catalogue() -> None:
    x = _inputs(3)
    full = _call(NextItemsLoss(Softmax.FULL, N_ITEMS), x, full_catalogue(N_ITEMS))
    errors = []
    for k in (N_ITEMS, 16 * N_ITEMS, 256 * N_ITEMS):
        fn = NextItemsLoss(Softmax.SAMPLED, N_ITEMS, num_sampled=k, in_batch_negatives=False)
        sampled = torch.stack([_call(fn, x, sample_uniform(N_ITEMS, k, seed=0, step=s)) for s in range(4)]).mean()
        errors.append(abs(float(sampled - full)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.01 * float(full), errors


def test_exhaustive_candidates_without_correction_are_the_full_softmax() -> None:
    x = _inputs(4)
    full = _call(NextItemsLoss(Softmax.FULL, N_ITEMS), x, full_catalogue(N_ITEMS))
    fn = NextItemsLoss(Softmax.SAMPLED, N_ITEMS, num_sampled=N_ITEMS - 1, in_batch_negatives=False)
    fn.logq_correction = False
    torch.testing.assert_close(_call(fn, x, full_catalogue(N_ITEMS)), full, rtol=1e-6, atol=1e-6)


def test_a_positive_is_never_its_own_negative() -> None:
    x = _inputs(5, groups=1, window=1)
    p = int(x["pos_ids"][0, 0])
    fn = NextItemsLoss(Softmax.SAMPLED, N_ITEMS, num_sampled=3, in_batch_negatives=True, logq_correction=False)
    others = torch.tensor([i for i in (1, 2, 3) if i != p] or [4])
    with_self = _call(fn, x, torch.cat([others, torch.tensor([p, p])]))
    without = _call(fn, x, others)
    # The in-batch positive (itself) and the sampled copies of p are all masked: only `others` remain.
    expected = -(x["query"][0] @ x["table"][p]) + torch.logsumexp(
        torch.cat([(x["query"][0] @ x["table"][p])[None], x["query"][0] @ x["table"][others].T]), dim=0
    )
    torch.testing.assert_close(with_self, without)
    torch.testing.assert_close(with_self, expected)


def test_in_batch_negatives_use_other_users_positives_with_logq() -> None:
    x = _inputs(6, groups=2, window=1)
    x["pos_ids"] = torch.tensor([[3], [9]])
    freq = torch.zeros(N_ITEMS)
    freq[3], freq[9] = 0.25, 0.75
    fn = NextItemsLoss(Softmax.SAMPLED, N_ITEMS, num_sampled=0, item_frequency=freq)
    loss = _call(fn, x, torch.zeros(0, dtype=torch.int64))
    q, t = x["query"], x["table"]
    # Group 0's only negative is item 9, expected 2 * 0.75 times in a batch of 2 positives; and vice versa.
    l0 = -(q[0] @ t[3]) + torch.logaddexp(q[0] @ t[3], q[0] @ t[9] - torch.log(torch.tensor(1.5)))
    l1 = -(q[1] @ t[9]) + torch.logaddexp(q[1] @ t[9], q[1] @ t[3] - torch.log(torch.tensor(0.5)))
    torch.testing.assert_close(loss, (l0 + l1) / 2)


def _split_rank(rank: int, world: int, x: dict[str, torch.Tensor], cand_ids: torch.Tensor) -> dict[str, Any]:
    table = x["table"].clone().requires_grad_(True)
    query = x["query"].clone().requires_grad_(True)
    rows = torch.arange(len(query))[rank::world]  # an uneven split on purpose when G is odd
    fn = NextItemsLoss(Softmax.SAMPLED, N_ITEMS, num_sampled=len(cand_ids))
    loss = fn(
        query[rows], table[x["pos_ids"][rows]], x["pos_ids"][rows], x["pos_mask"][rows], table[cand_ids], cand_ids
    )
    loss.backward()
    assert table.grad is not None and query.grad is not None
    return {"loss": loss.detach(), "table_grad": table.grad, "query_grad": query.grad}


@pytest.mark.parametrize("world", [2])
def test_loss_and_gradients_do_not_depend_on_how_the_batch_is_split_over_ranks(world: int) -> None:
    x = _inputs(7, groups=7)
    cand_ids = sample_uniform(N_ITEMS, 16, seed=1, step=0)
    single = _split_rank(0, 1, x, cand_ids)
    ranks = run_distributed(_split_rank, world, x, cand_ids)
    # Ranks average their losses and gradients (DDP / TorchRec's gradient division): that mean is the global one.
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], rtol=1e-5, atol=1e-6)
    for key in ("table_grad", "query_grad"):
        torch.testing.assert_close(torch.stack([r[key] for r in ranks]).mean(0), single[key], rtol=1e-5, atol=1e-6)
