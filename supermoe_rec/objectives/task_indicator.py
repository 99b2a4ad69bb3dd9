"""Multi-task loss with task indicators: every task is averaged over its own labelled samples only.

Dimension letters: B batch, T tasks.

A sample carries a label for some tasks and not others (``task_mask[i, t]`` is 1 when it does), so a plain batch
mean would let unlabelled samples dilute a task's loss, and the dilution would change from batch to batch. The loss
is::

    L = Σ_t w_t · (Σ_i m_it · ℓ_t(ŷ_it, y_it)) / max(1, Σ_i m_it)  +  α · L_balance  +  β · L_z

Labels may be NaN (or anything) where the mask is 0; masked entries never reach ℓ_t, so they cannot leak NaN into the
value or the gradient, and a masked sample gives exactly zero gradient to its task's logit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from supermoe_rec.config.experiment import RegressionLoss, TaskType
from supermoe_rec.config.tasks import TaskSpec

__all__ = ["LossOutput", "TaskIndicatorLoss"]


@dataclass(frozen=True)
class LossOutput:
    """What :class:`TaskIndicatorLoss` returns.

    Attributes:
        total: scalar to call ``backward`` on (weighted task losses plus weighted auxiliary losses).
        per_task: task name -> detached, unweighted mean loss of the task over its labelled samples (0 when the task
            has none). Under distributed normalisation it is this rank's share scaled by the world size, so the mean
            over ranks is the global per-task loss.
        labelled: task name -> number of samples labelled for the task in this rank's batch (int64 scalar); the sum
            over ranks is the global count.
        balance_loss: detached, unweighted load-balancing loss (0 when none was given).
        z_loss: detached, unweighted router z-loss (0 when none was given).
    """

    total: torch.Tensor
    per_task: dict[str, torch.Tensor]
    labelled: dict[str, torch.Tensor]
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    # Detached next-items loss of the [USER] vector (supermoe_rec/objectives/next_items.py); None when the run has none.
    next_items: torch.Tensor | None = None


class TaskIndicatorLoss(nn.Module):
    """Masked multi-task loss: each task averaged over its labelled samples, weighted, plus MoE auxiliary losses.

    Dimension letters: B batch, T tasks.

    ``ℓ_t`` is binary cross-entropy with logits for :attr:`TaskType.BINARY` tasks, and squared error or Huber for
    :attr:`TaskType.REGRESSION` tasks.

    **Task weights.** ``w_t`` is ``task_weights[name]`` (missing tasks weigh 1.0). With ``uncertainty_weighting``
    each task also gets a learned log-variance ``s_t`` (a parameter, initialised to 0, optimised with the other
    dense parameters), and its term becomes the homoscedastic-uncertainty form::

        regression:  w_t · (0.5 · exp(-s_t) · L_t + 0.5 · s_t)
        binary:      w_t · (      exp(-s_t) · L_t + 0.5 · s_t)

    A task with no labelled sample in the batch (globally, when distributed) contributes exactly 0, including its
    ``0.5 · s_t`` regulariser, so absent tasks do not drift their ``s_t``.

    **Distributed normalisation.** With a process group, every task is normalised by its *global* labelled count
    (an all-reduce SUM of the per-task counts, without gradient), and each rank returns::

        L_t(rank) = world_size · Σ_{i on rank} m_it · ℓ_t / max(1, Σ_{all ranks} m_it)

    so the mean of the per-rank losses, and DDP's averaged gradients, equal the single-process loss and gradients on
    the concatenated batch, however unevenly the labels fall across ranks. The group is the ``process_group``
    argument of :meth:`forward`, or, when ``global_normalization=True`` and ``torch.distributed`` is initialised,
    the default group. The auxiliary losses are added as given (each rank's own value, averaged by DDP). Parameters
    of this module (``log_vars``) must sit inside the DDP-wrapped model so that their gradients are averaged too.

    Args:
        tasks: the T tasks, in the column order of ``labels`` and ``task_mask``.
        task_weights: static weight per task name; a name that is not a task is a ``ValueError``.
        uncertainty_weighting: learn per-task log-variances ``s_t`` as above.
        regression_loss: ``MSE`` or ``HUBER`` for regression tasks.
        huber_delta: the Huber threshold (the loss is quadratic within ``delta`` of the label).
        balance_loss_weight: α, the weight of the MoE load-balancing loss.
        z_loss_weight: β, the weight of the router z-loss.
        global_normalization: normalise by global counts over the default process group whenever
            ``torch.distributed`` is initialised (``forward``'s ``process_group`` takes precedence).
        device: where ``log_vars`` lives; ``torch.device("meta")`` defers allocation.

    Example::

        >>> from supermoe_rec.config.experiment import TaskType
        >>> from supermoe_rec.config.tasks import TaskSpec
        >>> tasks = [TaskSpec("click", TaskType.BINARY), TaskSpec("rating", TaskType.REGRESSION)]
        >>> loss_fn = TaskIndicatorLoss(tasks, task_weights={"rating": 0.5})
        >>> logits = {"click": torch.zeros(2), "rating": torch.tensor([3.0, 0.0])}
        >>> labels = torch.tensor([[1.0, 4.0], [0.0, float("nan")]])  # sample 1 has no rating
        >>> mask = torch.tensor([[1, 1], [1, 0]])
        >>> out = loss_fn(logits, labels, mask)
        >>> round(out.per_task["click"].item(), 4), out.per_task["rating"].item(), int(out.labelled["rating"])
        (0.6931, 1.0, 1)
        >>> round(out.total.item(), 4)  # ln 2 + 0.5 * 1
        1.1931
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        task_weights: Mapping[str, float] | None = None,
        uncertainty_weighting: bool = False,
        regression_loss: RegressionLoss = RegressionLoss.MSE,
        huber_delta: float = 1.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        global_normalization: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("TaskIndicatorLoss needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        weights = dict(task_weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"task_weights: unknown task(s) {unknown} (known: {', '.join(names)})")
        for name, w in weights.items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"task_weights.{name}: must be finite and >= 0, got {w}")
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        self.tasks: tuple[TaskSpec, ...] = tuple(tasks)
        self.weights: tuple[float, ...] = tuple(float(weights.get(n, 1.0)) for n in names)
        self.regression_loss = RegressionLoss(regression_loss)
        self.huber_delta = float(huber_delta)
        self.balance_loss_weight = float(balance_loss_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.global_normalization = global_normalization
        self.log_vars: nn.Parameter | None = None
        if uncertainty_weighting:
            self.log_vars = nn.Parameter(torch.empty(len(tasks), device=device))  # (T,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start every log-variance at 0, i.e. unit precision: the weights begin as the static ones."""
        if self.log_vars is not None:
            with torch.no_grad():
                self.log_vars.zero_()

    def _pointwise(self, task: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ℓ_t, (B,) -> (B,)."""
        if task.type is TaskType.BINARY:
            return F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        if self.regression_loss is RegressionLoss.HUBER:
            return F.huber_loss(pred, target, reduction="none", delta=self.huber_delta)
        return (pred - target).square()

    def _resolve_group(self, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
        if process_group is not None:
            return process_group
        if self.global_normalization and dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def _check_inputs(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor, task_mask: torch.Tensor) -> None:
        names = [t.name for t in self.tasks]
        missing = [n for n in names if n not in logits]
        extra = sorted(set(logits) - set(names))
        if missing or extra:
            raise ValueError(
                f"logits keys must be the loss's tasks: missing {missing}, unknown {extra} (known: {', '.join(names)})"
            )
        if labels.dim() != 2 or labels.shape[1] != len(names):
            raise ValueError(f"labels must be [B, T={len(names)}], got {list(labels.shape)}")
        if task_mask.shape != labels.shape:
            raise ValueError(f"task_mask {list(task_mask.shape)} must have the shape of labels {list(labels.shape)}")
        for name in names:
            if logits[name].shape != labels.shape[:1]:
                raise ValueError(f"logits[{name!r}] must be [B={labels.shape[0]}], got {list(logits[name].shape)}")

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        task_mask: torch.Tensor,
        balance_loss: torch.Tensor | None = None,
        z_loss: torch.Tensor | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> LossOutput:
        """Compute the masked multi-task loss.

        Args:
            logits: task name -> predictions [B] (a logit for binary tasks, a value for regression tasks).
            labels: [B, T] labels in task order; entries where ``task_mask`` is 0 are ignored and may be NaN.
            task_mask: [B, T], nonzero (or True) where the sample is labelled for the task.
            balance_loss: scalar MoE load-balancing loss, weighted by ``balance_loss_weight``.
            z_loss: scalar router z-loss, weighted by ``z_loss_weight``.
            process_group: normalise by labelled counts summed over this group (see the class docstring).

        Returns:
            :class:`LossOutput`: ``total`` a scalar; ``per_task`` and ``labelled`` scalars keyed by task name;
            ``balance_loss`` and ``z_loss`` detached scalars.
        """
        self._check_inputs(logits, labels, task_mask)
        first = logits[self.tasks[0].name]
        # Losses in at least fp32: a bf16 sum over a large batch loses the small terms.
        dtype = torch.promote_types(first.dtype, torch.float32)
        labelled = task_mask != 0  # (B, T) bool
        local_counts = labelled.sum(dim=0)  # (T,) int64
        group = self._resolve_group(process_group)
        world_size = 1
        global_counts = local_counts
        if group is not None:
            # Counts are data, not a function of the parameters: reduce them without autograd.
            with torch.no_grad():
                global_counts = local_counts.clone()
                dist.all_reduce(global_counts, op=dist.ReduceOp.SUM, group=group)
            world_size = dist.get_world_size(group)
        denom = global_counts.clamp(min=1).to(dtype)  # (T,)

        total = torch.zeros((), dtype=dtype, device=first.device)
        per_task: dict[str, torch.Tensor] = {}
        labelled_out: dict[str, torch.Tensor] = {}
        for t, task in enumerate(self.tasks):
            m = labelled[:, t]  # (B,)
            # Replace masked predictions and labels *before* ℓ: torch.where routes exactly zero gradient to the
            # masked logits, and NaN/inf there (or in the label) never enters the arithmetic.
            pred = torch.where(m, logits[task.name].to(dtype), 0.0)  # (B,)
            target = torch.where(m, labels[:, t].to(dtype), 0.0)  # (B,)
            per_sample = torch.where(m, self._pointwise(task, pred, target), 0.0)  # (B,)
            task_loss = per_sample.sum() * world_size / denom[t]
            per_task[task.name] = task_loss.detach()
            labelled_out[task.name] = local_counts[t]
            if self.log_vars is not None:
                s = self.log_vars[t].to(dtype)
                scale = 0.5 if task.type is TaskType.REGRESSION else 1.0
                # Gate on the global count so every rank agrees on whether the regulariser is present.
                present = (global_counts[t] > 0).to(dtype)
                term = present * (scale * torch.exp(-s) * task_loss + 0.5 * s)
            else:
                term = task_loss
            total = total + self.weights[t] * term

        zero = torch.zeros((), dtype=dtype, device=first.device)
        if balance_loss is not None:
            total = total + self.balance_loss_weight * balance_loss.to(dtype)
        if z_loss is not None:
            total = total + self.z_loss_weight * z_loss.to(dtype)
        return LossOutput(
            total=total,
            per_task=per_task,
            labelled=labelled_out,
            balance_loss=zero if balance_loss is None else balance_loss.detach(),
            z_loss=zero if z_loss is None else z_loss.detach(),
        )
