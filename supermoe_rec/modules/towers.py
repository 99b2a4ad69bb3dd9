"""Task towers: small MLPs that turn a (per-task) representation into one prediction per sample.

Dimension letters: B batch, F input features, H hidden width, T tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from supermoe_rec.config.tasks import TaskSpec

__all__ = ["MLP", "MultiTaskTowers", "TaskTower", "validate_task_names"]


def validate_task_names(tasks: Sequence[TaskSpec]) -> list[str]:
    """Task names in order; raises ``ValueError`` for none, duplicates, or names an ``nn.ModuleDict`` rejects."""
    names = [t.name for t in tasks]
    if not names:
        raise ValueError("at least one task is required")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    for name in names:
        # Names key nn.ModuleDicts, and so state_dict paths: a '.' would split the path.
        if not name or "." in name:
            raise ValueError(f"task name {name!r} must be non-empty and contain no '.'")
    return names


class MLP(nn.Module):
    """Feed-forward stack: ``Linear -> activation -> dropout`` per hidden layer, then an optional output ``Linear``.

    Dimension letters: B batch, F input features, H hidden width, O output features.

    With no hidden layers and no ``out_features`` it is the identity (``output_dim == in_features``).

    Args:
        in_features: F.
        hidden: widths of the hidden layers, each followed by the activation and dropout.
        out_features: O, width of a final linear layer without activation; ``None`` ends at the last hidden layer.
        activation: factory for the activation module (called once per hidden layer).
        dropout: dropout probability after each hidden activation.
        device: where parameters are created; ``torch.device("meta")`` defers allocation.

    Example::

        >>> mlp = MLP(8, hidden=[16, 4], out_features=2)
        >>> mlp.output_dim
        2
        >>> mlp(torch.randn(3, 8)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or any(h <= 0 for h in hidden) or (out_features is not None and out_features <= 0):
            raise ValueError(
                f"MLP widths must be positive: in={in_features}, hidden={list(hidden)}, out={out_features}"
            )
        # Linear layers sit in their own list, so parameter names (and checkpoints) do not depend on whether
        # dropout is on or which activation is used.
        self.hidden_layers = nn.ModuleList()
        self.activations = nn.ModuleList()
        width = in_features
        for h in hidden:
            self.hidden_layers.append(nn.Linear(width, h, device=device))
            self.activations.append(activation())
            width = h
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_layer: nn.Linear | None = None
        if out_features is not None:
            self.output_layer = nn.Linear(width, out_features, device=device)
            width = out_features
        self.in_features = in_features
        self.output_dim: int = width

    def reset_parameters(self) -> None:
        """Re-initialise every linear layer (needed after ``to_empty`` from ``meta``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stack.

        Args:
            x: [..., F] inputs.

        Returns:
            [..., output_dim] outputs.
        """
        for linear, act in zip(self.hidden_layers, self.activations, strict=True):
            x = self.dropout(act(linear(x)))
        if self.output_layer is not None:
            x = self.output_layer(x)
        return x


class TaskTower(nn.Module):
    """One task's head: an :class:`MLP` body and a linear output of width 1, squeezed to one value per sample.

    Dimension letters: B batch, F input features, H hidden width.

    For a binary task the output is a logit; for a regression task it is the predicted value. The output layer's
    bias starts at ``output_bias``, so a regression tower can start centred on the label mean (and a binary tower on
    the base rate's logit) instead of spending its first steps moving there.

    Args:
        in_features: F.
        hidden: widths of the body's hidden layers (may be empty: a linear model).
        task: the task this tower predicts.
        output_bias: initial bias of the output layer.
        activation: factory for the body's activations.
        dropout: dropout probability in the body.
        device: where parameters are created; ``torch.device("meta")`` defers allocation.

    Example::

        >>> from supermoe_rec.config.experiment import TaskType
        >>> from supermoe_rec.config.tasks import TaskSpec
        >>> tower = TaskTower(8, [16], TaskSpec("rating", TaskType.REGRESSION), output_bias=3.5)
        >>> tower(torch.randn(4, 8)).shape
        torch.Size([4])
        >>> tower.head.bias.item()
        3.5
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        task: TaskSpec,
        output_bias: float = 0.0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.output_bias = float(output_bias)
        self.body = MLP(in_features, hidden, activation=activation, dropout=dropout, device=device)
        self.head = nn.Linear(self.body.output_dim, 1, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for the linear layers, then the output bias set to ``output_bias``."""
        self.body.reset_parameters()
        self.head.reset_parameters()
        with torch.no_grad():
            self.head.bias.fill_(self.output_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict.

        Args:
            x: [B, F] representation for this task.

        Returns:
            [B] logits (binary) or values (regression).
        """
        out: torch.Tensor = self.head(self.body(x))  # (B, 1)
        return out.squeeze(-1)  # (B,)


class MultiTaskTowers(nn.Module):
    """One :class:`TaskTower` per task, predictions keyed by task name.

    Dimension letters: B batch, F_t input features of task t, H hidden width, T tasks.

    Args:
        tasks: the T tasks; names key the towers and the predictions.
        in_features: F shared by every tower, or a mapping task name -> F_t.
        hidden: widths of each tower's hidden layers.
        output_bias: task name -> initial output bias (missing tasks start at 0).
        activation: factory for the towers' activations.
        dropout: dropout probability in the towers.
        device: where parameters are created; ``torch.device("meta")`` defers allocation.

    Example::

        >>> from supermoe_rec.config.experiment import TaskType
        >>> from supermoe_rec.config.tasks import TaskSpec
        >>> tasks = [TaskSpec("watch", TaskType.BINARY), TaskSpec("rating", TaskType.REGRESSION)]
        >>> towers = MultiTaskTowers(tasks, in_features=8, hidden=[16])
        >>> out = towers(torch.randn(4, 8))  # one representation shared by both towers
        >>> {name: tuple(p.shape) for name, p in out.items()}
        {'watch': (4,), 'rating': (4,)}
        >>> towers = MultiTaskTowers(tasks, in_features={"watch": 8, "rating": 6}, hidden=[16])
        >>> out = towers({"watch": torch.randn(4, 8), "rating": torch.randn(4, 6)})
        >>> out["rating"].shape
        torch.Size([4])
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        in_features: int | Mapping[str, int],
        hidden: Sequence[int],
        output_bias: Mapping[str, float] | None = None,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        names = validate_task_names(tasks)
        if isinstance(in_features, Mapping):
            missing = [n for n in names if n not in in_features]
            extra = sorted(set(in_features) - set(names))
            if missing or extra:
                raise ValueError(f"in_features: missing tasks {missing}, unknown tasks {extra} (known: {names})")
            widths = {n: in_features[n] for n in names}
        else:
            widths = dict.fromkeys(names, in_features)
        biases = dict(output_bias or {})
        unknown = sorted(set(biases) - set(names))
        if unknown:
            raise ValueError(f"output_bias: unknown tasks {unknown} (known: {names})")
        self.tasks: tuple[TaskSpec, ...] = tuple(tasks)
        self.towers = nn.ModuleDict(
            {
                t.name: TaskTower(
                    widths[t.name],
                    hidden,
                    t,
                    output_bias=biases.get(t.name, 0.0),
                    activation=activation,
                    dropout=dropout,
                    device=device,
                )
                for t in tasks
            }
        )

    def reset_parameters(self) -> None:
        """Re-initialise every tower."""
        for tower in self.towers.values():
            assert isinstance(tower, TaskTower)
            tower.reset_parameters()

    def forward(self, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run every tower.

        Args:
            inputs: [B, F] shared by all towers, or task name -> [B, F_t].

        Returns:
            task name -> [B] prediction, in task order.
        """
        if isinstance(inputs, torch.Tensor):
            return {t.name: self.towers[t.name](inputs) for t in self.tasks}
        missing = [t.name for t in self.tasks if t.name not in inputs]
        if missing:
            raise KeyError(f"no input for task(s) {missing} (got: {sorted(inputs)})")
        return {t.name: self.towers[t.name](inputs[t.name]) for t in self.tasks}
