"""Model + loss in one module whose forward returns ``(loss, output)``, the contract of TorchRec's train pipelines.

``TrainPipelineSparseDist(train_module, optimizer, device).progress(iterator)`` runs forward, backward and the
optimizer step and returns the :class:`StepOutput`; a plain loop does the same by hand (see :func:`train_step`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from supermoe_rec.config.experiment import Objective
from supermoe_rec.data.batch import Batch
from supermoe_rec.models.supermoe import ModelOutput, NextItemsInputs
from supermoe_rec.objectives.next_items import NextItemsLoss, Softmax
from supermoe_rec.objectives.ranking import NO_RANK, target_ranks
from supermoe_rec.objectives.task_indicator import LossOutput, TaskIndicatorLoss


@dataclass
class StepOutput:
    """One step's loss parts, model outputs (predictions detached), and the labels they were scored against.

    The labels travel with the output because a train pipeline consumes the batch itself: metrics read them here.
    """

    loss: LossOutput
    model: ModelOutput
    labels: torch.Tensor
    task_mask: torch.Tensor
    user_index: torch.Tensor
    # [G] 1-based rank of each group's first future item among the whole catalogue (full softmax only; 0: no
    # future item), for next-item retrieval metrics (HR@K, NDCG@K; supermoe_rec.objectives.ranking's convention);
    # None without the next-items objective.
    next_item_rank: torch.Tensor | None = None


class StepHead(nn.Module):
    """Loss and step output from a model output and its batch (a table-free module: one node of the fx trace).

    Args:
        loss_fn: the task-indicator loss of the towers.
        next_items_loss: the next-items loss of the [USER] vector (``None``: the model is trained by the towers).
        objective: how the two combine (:class:`Objective`).
        next_items_weight: the next-items loss's weight.
    """

    def __init__(
        self,
        loss_fn: TaskIndicatorLoss,
        next_items_loss: NextItemsLoss | None = None,
        objective: Objective = Objective.SUPERVISED,
        next_items_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if objective is not Objective.SUPERVISED and next_items_loss is None:
            raise ValueError(f"objective {objective.value} needs a next-items loss")
        self.loss_fn = loss_fn
        self.next_items_loss = next_items_loss
        self.objective = objective
        self.next_items_weight = next_items_weight

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        loss = self.loss_fn(out.predictions, batch.labels, batch.task_mask, out.balance_loss, out.z_loss)
        rank: torch.Tensor | None = None
        if self.next_items_loss is not None and out.next_items is not None:
            ni = out.next_items
            ni_loss = self.next_items_loss(
                ni.query, ni.positives, ni.positive_ids, ni.positive_mask, ni.candidates, ni.candidate_ids
            )
            if self.objective is Objective.JOINT:
                total = loss.total + self.next_items_weight * ni_loss
            elif self.objective is Objective.NEXT_ITEMS:
                # Self-supervised: no task label is read; the MoE auxiliary losses still balance the experts.
                total = (
                    self.next_items_weight * ni_loss
                    + self.loss_fn.balance_loss_weight * out.balance_loss
                    + self.loss_fn.z_loss_weight * out.z_loss
                )
            else:
                total = loss.total  # supervised: the next-items loss is measured, not trained
            loss = dataclasses.replace(loss, total=total, next_items=ni_loss.detach())
            # Batches built without candidates (export, probes) carry no catalogue to rank against; training steps
            # skip the ranking (a second catalogue-wide scoring that only evaluation reports).
            if not self.training and self.next_items_loss.softmax is Softmax.FULL and ni.candidate_ids.numel():
                rank = catalogue_rank(ni)
        out.predictions = {k: v.detach() for k, v in out.predictions.items()}
        out.next_items = None  # the loss has read it: the step output keeps no graph
        step = StepOutput(loss, out, batch.labels, batch.task_mask, batch.user_index, next_item_rank=rank)
        return loss.total, step


def catalogue_rank(ni: NextItemsInputs) -> torch.Tensor:
    """[G] 1-based rank of each group's first future item when the candidates are the whole catalogue, by
    :func:`~supermoe_rec.objectives.ranking.target_ranks` (ties: the smaller item id first). Groups without a future
    item get 0.

    Example::

        >>> ni = NextItemsInputs(torch.eye(2), torch.zeros(2, 1, 2), torch.tensor([[2], [1]]), torch.ones(2, 1),
        ...                      torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 2, 3]))
        >>> catalogue_rank(ni).tolist()  # user 0 scores items 1 and 3 above 2; user 1 scores only item 2 above 1
        [3, 2]
    """
    with torch.no_grad():
        rank = target_ranks(ni.query @ ni.candidates.T, ni.positive_ids[:, 0], ni.candidate_ids)
        return torch.where(ni.positive_mask[:, 0] > 0, rank, torch.full_like(rank, NO_RANK))


class TrainModule(nn.Module):
    """Wrap a model and its :class:`TaskIndicatorLoss`: ``forward(batch) -> (loss, StepOutput)``.

    Args:
        model: any model returning :class:`ModelOutput` (SuperMoERec, MultiTaskMLPRec).
        loss_fn: the task-indicator loss over the model's tasks.

    Example::

        >>> from supermoe_rec.config.experiment import ModelConfig
        >>> from supermoe_rec.models.factory import build_model, tiny_schema_and_batch
        >>> schema, batch = tiny_schema_and_batch()
        >>> module = TrainModule(build_model(ModelConfig(), schema), TaskIndicatorLoss(schema.task_specs()))
        >>> loss, out = module(batch)
        >>> loss.shape, sorted(out.loss.per_task)
        (torch.Size([]), ['click', 'rating'])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: TaskIndicatorLoss,
        next_items_loss: NextItemsLoss | None = None,
        objective: Objective = Objective.SUPERVISED,
        next_items_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = StepHead(loss_fn, next_items_loss, objective, next_items_weight)

    @property
    def loss_fn(self) -> TaskIndicatorLoss:
        return self.head.loss_fn

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        """Returns: the scalar loss to backpropagate, and the step's :class:`StepOutput`."""
        result: tuple[torch.Tensor, StepOutput] = self.head(self.model(batch), batch)
        return result


def train_step(module: TrainModule, optimizer: torch.optim.Optimizer, batch: Batch) -> StepOutput:
    """One forward/backward/update without a pipeline (tests, single-process tools)."""
    module.train()
    loss, out = module(batch)
    assert isinstance(out, StepOutput)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out
