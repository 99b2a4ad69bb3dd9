"""Task descriptions shared by data, towers, loss and metrics."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TaskType(str, enum.Enum):
    """How a task's label is modelled: a binary logit or a regression value."""

    BINARY = "binary"
    REGRESSION = "regression"


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: its name (the key of predictions and metrics) and how its label is modelled."""

    name: str
    type: TaskType
