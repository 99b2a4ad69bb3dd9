"""Per-task evaluation metrics (ml100k-mt protocol), exact across ranks.

Dimension letters: B batch, T tasks, N labelled rows of one task (accumulated over batches and ranks), U users.

Every metric of task ``t`` sees only the rows whose ``task_mask[:, t]`` is 1; labels elsewhere may be anything (NaN
included). Binary tasks report ``auc``, ``gauc``, ``gauc_users``, ``logloss`` and ``count``; regression tasks report
``rmse``, ``mae`` and ``count``.

AUC and GAUC come from one rank-sum (Mann-Whitney) kernel: tied scores get the average of their ranks, which is what
``sklearn.metrics.roc_auc_score`` computes. Scores are ranked as raw logits, not as probabilities, because a float
sigmoid saturates (every logit above ~17 becomes 1.0 in float32) and would turn distinct scores into ties.

Under ``torch.distributed`` the labelled rows of every rank are gathered and the metrics computed on their union, so
every rank gets the value a single process would get on all the data: AUC and GAUC are not means over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from supermoe_rec.config.experiment import TaskType
from supermoe_rec.config.tasks import TaskSpec

__all__ = ["MultiTaskEvaluator", "group_auc", "primary_metric"]

NAN = float("nan")


def primary_metric(task: TaskSpec) -> tuple[str, bool]:
    """The metric that ranks models on ``task`` (early stopping, MTL gain).

    Args:
        task: the task.

    Example::

        >>> primary_metric(TaskSpec("watch", TaskType.BINARY)), primary_metric(TaskSpec("rating", TaskType.REGRESSION))
        (('auc', True), ('rmse', False))

    Returns:
        ``(metric name, higher_is_better)``: ``("auc", True)`` for binary tasks, ``("rmse", False)`` for regression.
    """
    if task.type is TaskType.BINARY:
        return "auc", True
    if task.type is TaskType.REGRESSION:
        return "rmse", False
    raise ValueError(f"no primary metric for task type {task.type!r}")


def _auc_per_group(scores: Tensor, labels: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-sum AUC of every group at once, with average ranks for ties (vectorised, one sort).

    Args:
        scores: [N] scores (any monotone scale, e.g. logits), no NaN.
        labels: [N] labels in {0, 1}.
        groups: [N] int64 group codes (any values).

    Returns:
        ``(auc [U], rows [U], defined [U])`` over the U distinct groups in ascending code order: the AUC (NaN where
        the group has a single class), the group's number of rows, and whether both classes occur in it.
    """
    n = scores.numel()
    # Lexicographic sort by (group, score) with two stable sorts: the second keeps the score order inside a group.
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    s, y, g = scores[order], labels[order].to(torch.float64), groups[order]  # (N,)

    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.clone()  # a run = a maximal block of equal (group, score): one tie group
    new_run[1:] |= s[1:] != s[:-1]

    pos = torch.arange(n, dtype=torch.float64)  # (N,) 0-based position in sorted order
    run_id = torch.cumsum(new_run, 0) - 1  # (N,)
    run_len = torch.bincount(run_id).to(torch.float64)  # (runs,)
    avg_pos = pos[new_run][run_id] + (run_len[run_id] - 1.0) / 2.0  # (N,) tied rows share their mean position
    group_id = torch.cumsum(new_group, 0) - 1  # (N,) 0..U-1
    rank = avg_pos - pos[new_group][group_id] + 1.0  # (N,) 1-based average rank inside the group

    u = int(group_id[-1].item()) + 1 if n else 0
    rows = torch.zeros(u, dtype=torch.float64).index_add_(0, group_id, torch.ones_like(y))  # (U,)
    n_pos = torch.zeros(u, dtype=torch.float64).index_add_(0, group_id, y)  # (U,)
    rank_sum_pos = torch.zeros(u, dtype=torch.float64).index_add_(0, group_id, rank * y)  # (U,)
    n_neg = rows - n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    # Mann-Whitney: U = R_pos - n_pos (n_pos + 1) / 2 counts (positive, negative) pairs ordered correctly, ties as 1/2.
    auc = (rank_sum_pos - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
    auc = torch.where(defined, auc, torch.full_like(auc, NAN))
    return auc, rows, defined


def group_auc(scores: Tensor, labels: Tensor, groups: Tensor) -> tuple[float, int]:
    """GAUC: the AUC of each group (user), averaged with the group's number of rows as weight.

    Groups whose rows are all one class have no AUC and are skipped (they add to neither the numerator nor the
    weights); the number of groups that counted is returned with the value.

    Args:
        scores: [N] scores (logits or probabilities; only their order matters).
        labels: [N] labels in {0, 1}.
        groups: [N] int64 group codes, e.g. user ids.

    Example::

        >>> scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8])
        >>> labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
        >>> groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one class: skipped
        >>> group_auc(scores, labels, groups)
        (1.0, 2)

    Returns:
        ``(gauc, groups counted)``; ``(nan, 0)`` when no group has both classes or a score is NaN.
    """
    scores = scores.detach().cpu().to(torch.float64).reshape(-1)
    if scores.numel() == 0 or bool(torch.isnan(scores).any()):
        return NAN, 0
    auc, rows, defined = _auc_per_group(scores, labels.detach().cpu().reshape(-1), groups.detach().cpu().reshape(-1))
    counted = int(defined.sum().item())
    if counted == 0:
        return NAN, 0
    return float((auc[defined] * rows[defined]).sum() / rows[defined].sum()), counted


def _binary_metrics(scores: Tensor, labels: Tensor, users: Tensor) -> dict[str, float]:
    """AUC, GAUC, log loss and count of one binary task; ``scores`` [N] are logits, all float64 on CPU."""
    n = scores.numel()
    if n == 0:
        return {"auc": NAN, "gauc": NAN, "gauc_users": 0.0, "logloss": NAN, "count": 0.0}
    auc, _ = group_auc(scores, labels, torch.zeros_like(users))  # one group: the plain AUC
    gauc, gauc_users = group_auc(scores, labels, users)
    # sklearn's log_loss: probability of the true class clipped to [eps, 1 - eps] of its dtype (float64 here).
    p = torch.sigmoid(scores)
    p_true = torch.where(labels == 1, p, 1.0 - p)
    eps = torch.finfo(torch.float64).eps
    logloss = float(-torch.log(p_true.clamp(eps, 1.0 - eps)).mean())
    return {"auc": auc, "gauc": gauc, "gauc_users": float(gauc_users), "logloss": logloss, "count": float(n)}


def _regression_metrics(values: Tensor, labels: Tensor) -> dict[str, float]:
    """RMSE, MAE and count of one regression task; float64 on CPU."""
    n = values.numel()
    if n == 0:
        return {"rmse": NAN, "mae": NAN, "count": 0.0}
    err = values - labels
    return {"rmse": math.sqrt(float((err * err).mean())), "mae": float(err.abs().mean()), "count": float(n)}


def _all_gather_rows(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's [N_r, C] rows in rank order (N_r may differ): gather sizes, pad, gather, trim."""
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else x.device
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)  # (max N_r, C)
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:c] for g, c in zip(gathered, counts, strict=True)]).cpu()  # (Σ N_r, C)


class MultiTaskEvaluator:
    """Accumulates predictions over batches and computes per-task metrics on labelled rows only.

    Binary tasks get ``auc``, ``gauc`` (per-user AUC weighted by the user's labelled rows; users whose labelled rows
    are all one class are skipped and ``gauc_users`` says how many users counted), ``logloss`` (on the sigmoid of
    the logit, clipped like scikit-learn) and ``count``. Regression tasks get ``rmse``, ``mae`` and ``count``. A task
    with no labelled rows gets count 0 and NaN metrics; an AUC over a single class is NaN.

    Args:
        tasks: the tasks, in the column order of ``labels`` / ``task_mask`` [B, T].

    Example::

        >>> ev = MultiTaskEvaluator([TaskSpec("watch", TaskType.BINARY), TaskSpec("rating", TaskType.REGRESSION)])
        >>> predictions = {"watch": torch.tensor([2.0, -1.0, 0.5, 0.0]), "rating": torch.tensor([4.0, 0.0, 2.0, 0.0])}
        >>> labels = torch.tensor([[1.0, 5.0], [0.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
        >>> task_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
        >>> ev.update(predictions, labels, task_mask, user_index=torch.tensor([0, 0, 1, 1]))
        >>> m = ev.compute()
        >>> m["watch"]["auc"], m["watch"]["gauc"], m["watch"]["gauc_users"], m["watch"]["count"]
        (1.0, 1.0, 2.0, 4.0)
        >>> m["rating"]
        {'rmse': 1.0, 'mae': 1.0, 'count': 2.0}
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        # Per task: labelled rows of each update, float64 [n, 2] (prediction, label) and int64 [n] users.
        self._values: list[list[Tensor]] = [[] for _ in self.tasks]
        self._users: list[list[Tensor]] = [[] for _ in self.tasks]

    def update(self, predictions: Mapping[str, Tensor], labels: Tensor, task_mask: Tensor, user_index: Tensor) -> None:
        """Add one batch: keeps, detached and on CPU, the labelled rows of every task.

        Args:
            predictions: task name -> [B] logits (binary tasks) or values (regression tasks).
            labels: [B, T] labels; ignored where ``task_mask`` is 0 (may be NaN there).
            task_mask: [B, T], 1 (or True) where the row is labelled for the task.
            user_index: [B] int64 user codes (GAUC groups).
        """
        labels = labels.detach().cpu()
        mask = task_mask.detach().cpu() != 0  # (B, T)
        users = user_index.detach().cpu().to(torch.int64)
        b = users.shape[0]
        if labels.shape != (b, len(self.tasks)) or mask.shape != labels.shape:
            raise ValueError(
                f"expected labels and task_mask of shape [B={b}, T={len(self.tasks)}], "
                f"got {tuple(labels.shape)} and {tuple(mask.shape)}"
            )
        for t, task in enumerate(self.tasks):
            if task.name not in predictions:
                raise KeyError(f"no prediction for task {task.name!r} (got {', '.join(predictions)})")
            pred = predictions[task.name].detach().cpu().to(torch.float64).reshape(-1)
            if pred.shape[0] != b:
                raise ValueError(f"predictions[{task.name!r}] has {pred.shape[0]} rows, expected {b}")
            m = mask[:, t]
            y = labels[m, t].to(torch.float64)
            if task.type is TaskType.BINARY and not bool(((y == 0) | (y == 1)).all()):
                raise ValueError(f"labelled rows of binary task {task.name!r} must be 0 or 1")
            self._values[t].append(torch.stack([pred[m], y], dim=1))  # (n, 2)
            self._users[t].append(users[m])  # (n,)

    def _local_rows(self) -> tuple[Tensor, Tensor]:
        """All accumulated rows packed for one gather: float64 [N, 2] (prediction, label), int64 [N, 2] (task, user)."""
        values = [torch.zeros(0, 2, dtype=torch.float64)]
        keys = [torch.zeros(0, 2, dtype=torch.int64)]
        for t in range(len(self.tasks)):
            for v, u in zip(self._values[t], self._users[t], strict=True):
                values.append(v)
                keys.append(torch.stack([torch.full_like(u, t), u], dim=1))
        return torch.cat(values), torch.cat(keys)

    def compute(self, process_group: dist.ProcessGroup | None = None) -> dict[str, dict[str, float]]:
        """Metrics of every task over everything accumulated (on all ranks, when distributed).

        A collective when ``process_group`` is given or ``torch.distributed`` is initialised: every rank of the group
        must call it, and every rank gets the same result.

        Args:
            process_group: gather over this group; defaults to the default group when ``torch.distributed`` is
                initialised, else computes on this process's rows alone.

        Returns:
            task name -> ``{"auc", "gauc", "gauc_users", "logloss", "count"}`` (binary) or ``{"rmse", "mae",
            "count"}`` (regression), all Python floats.
        """
        values, keys = self._local_rows()  # (N, 2), (N, 2)
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        if process_group is not None and dist.get_world_size(process_group) > 1:
            values = _all_gather_rows(values, process_group)
            keys = _all_gather_rows(keys, process_group)
        results: dict[str, dict[str, float]] = {}
        for t, task in enumerate(self.tasks):
            rows = keys[:, 0] == t
            pred, y, users = values[rows, 0], values[rows, 1], keys[rows, 1]  # (N_t,) each
            if task.type is TaskType.BINARY:
                results[task.name] = _binary_metrics(pred, y, users)
            else:
                results[task.name] = _regression_metrics(pred, y)
        return results
