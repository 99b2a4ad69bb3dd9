"""Model + loss in one module whose forward returns ``(loss, output)``, the contract of TorchRec's train pipelines.

``TrainPipelineSparseDist(train_module, optimizer, device).progress(iterator)`` runs forward, backward and the
optimizer step and returns the :class:`StepOutput`; a plain loop does the same by hand (see :func:`train_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from supermoe_rec.data.batch import Batch
from supermoe_rec.loss import LossOutput, TaskIndicatorLoss
from supermoe_rec.models.supermoe import ModelOutput


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


class StepHead(nn.Module):
    """Loss and step output from a model output and its batch (a table-free module: one node of the fx trace)."""

    def __init__(self, loss_fn: TaskIndicatorLoss) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, out: ModelOutput, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        loss = self.loss_fn(out.predictions, batch.labels, batch.task_mask, out.balance_loss, out.z_loss)
        out.predictions = {k: v.detach() for k, v in out.predictions.items()}
        step = StepOutput(loss, out, labels=batch.labels, task_mask=batch.task_mask, user_index=batch.user_index)
        return loss.total, step


class TrainModule(nn.Module):
    """Wrap a model and its :class:`TaskIndicatorLoss`: ``forward(batch) -> (loss, StepOutput)``.

    Args:
        model: any model returning :class:`ModelOutput` (SuperMoERec, MultiTaskMLPRec).
        loss_fn: the task-indicator loss over the model's tasks.

    Example::

        >>> from supermoe_rec.config import ModelConfig
        >>> from supermoe_rec.models.factory import build_model, tiny_schema_and_batch
        >>> schema, batch = tiny_schema_and_batch()
        >>> module = TrainModule(build_model(ModelConfig(), schema), TaskIndicatorLoss(schema.task_specs()))
        >>> loss, out = module(batch)
        >>> loss.shape, sorted(out.loss.per_task)
        (torch.Size([]), ['click', 'rating'])
    """

    def __init__(self, model: nn.Module, loss_fn: TaskIndicatorLoss) -> None:
        super().__init__()
        self.model = model
        self.head = StepHead(loss_fn)

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
