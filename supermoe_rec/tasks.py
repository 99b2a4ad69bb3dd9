"""Task descriptions shared by data, towers, loss and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from supermoe_rec.config import TaskType


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: its name (the key of predictions and metrics) and how its label is modelled."""

    name: str
    type: TaskType


def task_index(tasks: Sequence[TaskSpec], name: str) -> int:
    """Column of task ``name`` in ``labels``/``task_mask`` [B, T]; a clear error for an unknown task."""
    for i, task in enumerate(tasks):
        if task.name == name:
            return i
    raise KeyError(f"unknown task {name!r} (known: {', '.join(t.name for t in tasks)})")
