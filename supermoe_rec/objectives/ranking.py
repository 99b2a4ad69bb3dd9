"""Next-item ranking: the one rank convention of training's evaluation, the retrieval suite and serving's top-k.

Dimension letters: B rows (users or groups, one query each), N candidate items (columns of the score matrix), k
results per row.

**The order.** Candidates are ordered by score, highest first; candidates with *equal* scores are ordered by id,
smallest first (the candidate's column when no ids are given). This is a total order: it is the order of a stable
descending sort of the catalogue by score when the catalogue is listed by ascending id.

**The rank** of a target is its 1-based position in that order: rank 1 is the best,

    rank = 1 + #{candidates scoring above the target} + #{candidates tied with the target whose id is smaller}.

Excluded candidates (items a user has already seen, or the padding row 0) are removed before ranking: they neither
rank ahead of the target nor appear in a top-k list. :func:`top_k` lists the first k candidates of the same order,
so a target at rank r (r ≤ k) is exactly the r-th item of its row's top-k list.

Why this tie rule, rather than "strictly above + 1" (every tie won) or the pessimistic "above + tied" (every tie
lost): it makes ranks and top-k lists agree, and it neither rewards nor punishes a model with tied scores as a
whole (a popularity baseline ties often); ``tests/test_universal.py`` brackets its retrieval figures between the
two extremes.

Metrics of one relevant item per row (:func:`rank_metrics`): HR@k = [rank ≤ k], NDCG@k = 1 / log2(rank + 1) and
MRR@k = 1 / rank when rank ≤ k, 0 otherwise; each averaged over the rows that have a rank.
"""

from __future__ import annotations

import torch

# A row without a rankable target (no future item, or the target is not among the candidates) gets rank 0.
NO_RANK = 0

__all__ = ["NO_RANK", "metrics_from_sums", "rank_metric_sums", "rank_metrics", "target_ranks", "top_k"]


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B] 1-based rank of each row's target among its candidates (rank 1 = best; ties: smaller id first).

    Args:
        scores: [B, N] each row's score of every candidate.
        targets: [B] each row's target id.
        ids: [N] the id of each candidate column (default: the column index, ``0..N-1``). A target that occurs in
            several columns is ranked at its best score.
        exclude: [B, N] True where a candidate is removed from the row's ranking (never counted ahead of the target).

    Returns:
        [B] int64 ranks; :data:`NO_RANK` (0) where the target is not among the row's candidates (or is excluded).

    Example::

        >>> scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]])
        >>> target_ranks(scores, torch.tensor([2, 0])).tolist()  # 0.9 and the tied id 1 come first; id 0 wins ties
        [3, 1]
    """
    with torch.no_grad():
        N = scores.shape[1]
        col_ids = torch.arange(N, device=scores.device) if ids is None else ids.to(scores.device)
        targets = targets.to(col_ids.dtype)
        is_target = col_ids[None, :] == targets[:, None]  # (B, N)
        keep = None if exclude is None else ~exclude.to(torch.bool)
        if keep is not None:
            is_target = is_target & keep
        target_score = torch.where(is_target, scores, float("-inf")).max(dim=1, keepdim=True).values  # (B, 1)
        ahead = (scores > target_score) | ((scores == target_score) & (col_ids[None, :] < targets[:, None]))
        if keep is not None:
            ahead = ahead & keep
        rank = ahead.sum(dim=1) + 1
        return torch.where(is_target.any(dim=1), rank, torch.full_like(rank, NO_RANK))


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` candidates of each row in the ranking order (score descending, ties: smaller column first).

    Args:
        scores: [B, N].
        k: results per row (≥ 1).
        exclude: [B, N] True where a candidate must not be returned.

    Returns:
        (scores [B, k], columns [B, k]), rank 1 first; -inf / -1 where fewer than ``k`` candidates remain. The
        candidate in position r - 1 is the one :func:`target_ranks` ranks r.

    Example::

        >>> values, columns = top_k(torch.tensor([[0.1, 0.5, 0.9, 0.5]]), 3)
        >>> columns.tolist()  # the two 0.5s tie: column 1 before column 3
        [[2, 1, 3]]
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    with torch.no_grad():
        B, N = scores.shape
        allowed = torch.ones_like(scores, dtype=torch.bool) if exclude is None else ~exclude.to(torch.bool)
        masked = torch.where(allowed, scores, float("-inf"))
        k_eff = min(k, N)
        values_out = torch.full((B, k), float("-inf"), dtype=scores.dtype, device=scores.device)
        columns_out = torch.full((B, k), -1, dtype=torch.long, device=scores.device)
        if k_eff == 0 or B == 0:
            return values_out, columns_out
        kth = torch.topk(masked, k_eff, dim=1).values[:, -1:]  # (B, 1) the k-th best score
        above = (masked > kth) & allowed
        tied = (masked == kth) & allowed
        need = k_eff - above.sum(dim=1, keepdim=True)  # how many of the tied candidates fit, smallest columns first
        take = above | (tied & (tied.cumsum(dim=1) <= need))  # (B, N): min(k, allowed) per row
        rows, cols = take.nonzero(as_tuple=True)  # row-major: columns ascending within a row
        slot = (take.cumsum(dim=1) - 1)[rows, cols]
        picked = torch.full((B, k_eff), -1, dtype=torch.long, device=scores.device)
        picked[rows, slot] = cols
        picked_values = torch.where(picked >= 0, masked.gather(1, picked.clamp(min=0)), float("-inf"))
        # A stable sort keeps tied candidates (and the -1 padding after them) in ascending column order.
        order = torch.sort(picked_values, dim=1, descending=True, stable=True).indices
        values_out[:, :k_eff] = picked_values.gather(1, order)
        columns_out[:, :k_eff] = picked.gather(1, order)
        return values_out, columns_out


def rank_metric_sums(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """[4] float64 sums over the rows with a rank (> 0): (rows, HR@k hits, Σ NDCG@k, Σ MRR@k).

    Sums, not means, so ranks can add them across batches and processes before dividing
    (:func:`metrics_from_sums` divides).
    """
    r = ranks[ranks > NO_RANK].to(torch.float64)
    hit = r <= k
    return torch.stack(
        [
            torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
            hit.to(torch.float64).sum(),
            torch.where(hit, 1.0 / torch.log2(r + 1.0), 0.0).sum(),
            torch.where(hit, 1.0 / r, 0.0).sum(),
        ]
    )


def rank_metrics(ranks: torch.Tensor, k: int = 10) -> dict[str, float]:
    """HR@k, NDCG@k and MRR@k averaged over the rows with a rank.

    Example::

        >>> {m: round(v, 4) for m, v in rank_metrics(torch.tensor([1, 3, 11])).items()}
        {'hr@10': 0.6667, 'ndcg@10': 0.5, 'mrr@10': 0.4444}
    """
    return metrics_from_sums(rank_metric_sums(ranks, k), k)


def metrics_from_sums(sums: torch.Tensor, k: int) -> dict[str, float]:
    """HR@k, NDCG@k and MRR@k from :func:`rank_metric_sums` (added over batches or processes); 0 without rows."""
    n = max(float(sums[0]), 1.0)
    return {f"hr@{k}": float(sums[1]) / n, f"ndcg@{k}": float(sums[2]) / n, f"mrr@{k}": float(sums[3]) / n}
