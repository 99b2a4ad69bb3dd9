"""Multi-task MLP baselines over one dense input vector: Shared-Bottom, MMoE and PLE.

Dimension letters: B batch, F input features, H expert/bottom output width, E experts, T tasks.

Each backbone maps x [B, F] to one representation per task, ``dict task name -> [B, H]`` with
``H == output_dim``, ready for :class:`~supermoe_rec.modules.towers.MultiTaskTowers`. A single-task baseline is any
of them built with one task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.modules.towers import MLP, validate_task_names

__all__ = ["PLE", "MMoE", "SharedBottom"]


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"expected x of shape [B, F={in_features}], got {list(x.shape)}")


def _reset_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()


def _experts(
    num: int,
    in_features: int,
    hidden: Sequence[int],
    activation: Callable[[], nn.Module],
    dropout: float,
    device: torch.device | None,
) -> nn.ModuleList:
    return nn.ModuleList(
        MLP(in_features, hidden, activation=activation, dropout=dropout, device=device) for _ in range(num)
    )


def _run_experts(experts: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [expert(x) for expert in experts.children()]  # E x (B, H)


def _mix(
    gate: nn.Module, gate_input: torch.Tensor, expert_outputs: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-gated sum of expert outputs; returns (mixture [B, H], gate weights [B, E])."""
    weights = torch.softmax(gate(gate_input), dim=-1)  # (B, E)
    stacked = torch.stack(expert_outputs, dim=1)  # (B, E, H)
    mixed = torch.bmm(weights.unsqueeze(1), stacked).squeeze(1)  # (B, 1, E) @ (B, E, H) -> (B, H)
    return mixed, weights


class SharedBottom(nn.Module):
    """Shared-Bottom: one MLP shared by all tasks; every task reads the same bottom output.

    Dimension letters: B batch, F input features, H output width (``hidden[-1]``), T tasks.

    Args:
        in_features: F.
        hidden: widths of the shared MLP's layers (each followed by the activation).
        tasks: the T tasks; their names key the output.
        activation: factory for the activations.
        dropout: dropout probability after each activation.
        device: where parameters are created; ``torch.device("meta")`` defers allocation.

    Example::

        >>> from supermoe_rec.config.experiment import TaskType
        >>> from supermoe_rec.config.tasks import TaskSpec
        >>> tasks = [TaskSpec("watch", TaskType.BINARY), TaskSpec("like", TaskType.BINARY)]
        >>> model = SharedBottom(8, [32, 16], tasks)
        >>> out = model(torch.randn(4, 8))
        >>> model.output_dim, out["watch"].shape, out["watch"] is out["like"]
        (16, torch.Size([4, 16]), True)
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        tasks: Sequence[TaskSpec],
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.task_names: list[str] = validate_task_names(tasks)
        self.in_features = in_features
        self.bottom = MLP(in_features, hidden, activation=activation, dropout=dropout, device=device)
        self.output_dim: int = self.bottom.output_dim

    def reset_parameters(self) -> None:
        """Re-initialise the bottom MLP."""
        self.bottom.reset_parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode once, share with every task.

        Args:
            x: [B, F] dense input.

        Returns:
            task name -> [B, H] (the same tensor for every task).
        """
        _check_input(x, self.in_features)
        h = self.bottom(x)  # (B, H)
        return dict.fromkeys(self.task_names, h)


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts: E shared expert MLPs, one softmax gate per task over all experts.

    Dimension letters: B batch, F input features, H expert output width (``expert_hidden[-1]``), E experts,
    T tasks.

    Every expert sees every sample (dense mixture); task t's representation is ``Σ_e softmax(W_t x)_e · expert_e(x)``.
    The last forward's gate weights are kept, detached, in ``last_gate_weights`` (task name -> [B, E]) for
    inspection.

    Args:
        in_features: F.
        num_experts: E.
        expert_hidden: widths of each expert MLP's layers (non-empty; each followed by the activation).
        tasks: the T tasks; their names key the gates and the output.
        activation: factory for the experts' activations.
        dropout: dropout probability inside the experts.
        device: where parameters are created; ``torch.device("meta")`` defers allocation.

    Example::

        >>> from supermoe_rec.config.experiment import TaskType
        >>> from supermoe_rec.config.tasks import TaskSpec
        >>> tasks = [TaskSpec("watch", TaskType.BINARY), TaskSpec("rating", TaskType.REGRESSION)]
        >>> model = MMoE(8, num_experts=3, expert_hidden=[16], tasks=tasks)
        >>> out = model(torch.randn(4, 8))
        >>> out["rating"].shape, model.last_gate_weights["rating"].shape
        (torch.Size([4, 16]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        tasks: Sequence[TaskSpec],
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not expert_hidden:
            raise ValueError("expert_hidden must name at least one layer")
        self.task_names: list[str] = validate_task_names(tasks)
        self.in_features = in_features
        self.num_experts = num_experts
        self.experts = _experts(num_experts, in_features, expert_hidden, activation, dropout, device)
        self.gates = nn.ModuleDict({n: nn.Linear(in_features, num_experts, device=device) for n in self.task_names})
        self.output_dim: int = expert_hidden[-1]
        self.last_gate_weights: dict[str, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        """Re-initialise experts and gates."""
        _reset_linears(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run all experts once, mix them per task.

        Args:
            x: [B, F] dense input.

        Returns:
            task name -> [B, H].
        """
        _check_input(x, self.in_features)
        expert_out = _run_experts(self.experts, x)  # E x (B, H)
        out: dict[str, torch.Tensor] = {}
        gates: dict[str, torch.Tensor] = {}
        for name in self.task_names:
            out[name], weights = _mix(self.gates[name], x, expert_out)
            gates[name] = weights.detach()
        self.last_gate_weights = gates
        return out


class _CGCLevel(nn.Module):
    """One Customized Gate Control level of PLE.

    Dimension letters: B batch, F input features, H expert output width, E_s shared experts, E_t experts per task,
    T tasks.

    Task t's gate reads task t's input and mixes ``[task t's E_t experts, the E_s shared experts]`` (in that order).
    The shared gate, present on every level but the last, reads the shared input and mixes
    ``[task 0's E_t experts, ..., task T-1's E_t experts, the E_s shared experts]``.
    """

    def __init__(
        self,
        in_features: int,
        task_names: list[str],
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: Sequence[int],
        with_shared_gate: bool,
        activation: Callable[[], nn.Module],
        dropout: float,
        device: torch.device | None,
    ) -> None:
        super().__init__()
        self.task_names = task_names
        self.shared_experts = _experts(num_shared_experts, in_features, expert_hidden, activation, dropout, device)
        self.task_experts = nn.ModuleDict(
            {n: _experts(num_task_experts, in_features, expert_hidden, activation, dropout, device) for n in task_names}
        )
        per_task = num_task_experts + num_shared_experts
        self.task_gates = nn.ModuleDict({n: nn.Linear(in_features, per_task, device=device) for n in task_names})
        self.shared_gate: nn.Linear | None = None
        if with_shared_gate:
            num_all = len(task_names) * num_task_experts + num_shared_experts
            self.shared_gate = nn.Linear(in_features, num_all, device=device)

    def forward(
        self, task_inputs: dict[str, torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor], torch.Tensor | None]:
        """Returns (task outputs name -> [B, H], shared output [B, H] or None, task gates, shared gate weights)."""
        shared_out = _run_experts(self.shared_experts, shared_input)  # E_s x (B, H)
        task_out = {n: _run_experts(self.task_experts[n], task_inputs[n]) for n in self.task_names}  # E_t x (B, H)
        outputs: dict[str, torch.Tensor] = {}
        gates: dict[str, torch.Tensor] = {}
        for n in self.task_names:
            outputs[n], gates[n] = _mix(self.task_gates[n], task_inputs[n], task_out[n] + shared_out)
        if self.shared_gate is None:
            return outputs, None, gates, None
        all_experts = [e for n in self.task_names for e in task_out[n]] + shared_out  # (T*E_t + E_s) x (B, H)
        shared_mix, shared_weights = _mix(self.shared_gate, shared_input, all_experts)
        return outputs, shared_mix, gates, shared_weights


class PLE(nn.Module):
    """Progressive Layered Extraction: stacked CGC levels of shared and task-specific experts.

    Dimension letters: B batch, F input features, H expert output width (``expert_hidden[-1]``), E_s shared experts
    per level, E_t experts per task per level, T tasks.

    Every level has E_s shared experts and E_t experts of its own per task. Task t's gate reads task t's
    representation from the previous level and mixes its own E_t experts with the E_s shared experts; the shared gate
    (every level but the last) reads the shared representation and mixes all T·E_t + E_s experts, producing the next
    level's shared input.
    Level 0 feeds x to everything; later levels take inputs of width H. Explicitly separating task experts from shared
    ones is what lets tasks avoid pulling one representation in opposite directions (the seesaw phenomenon).

    The last forward's gate weights are kept, detached: ``last_task_gates[level][task]`` is [B, E_t + E_s] and
    ``last_shared_gates[level]`` is [B, T·E_t + E_s] (no entry for the last level).

    Args:
        in_features: F.
        num_shared_experts: E_s (may be 0 if ``num_task_experts`` > 0).
        num_task_experts: E_t (may be 0 if ``num_shared_experts`` > 0).
        expert_hidden: widths of each expert MLP's layers (non-empty; each followed by the activation).
        tasks: the T tasks; their names key the gates and the output.
        num_levels: number of stacked CGC levels (1 is a single CGC).
        activation: factory for the experts' activations.
        dropout: dropout probability inside the experts.
        device: where parameters are created; ``torch.device("meta")`` defers allocation.

    Example::

        >>> from supermoe_rec.config.experiment import TaskType
        >>> from supermoe_rec.config.tasks import TaskSpec
        >>> tasks = [TaskSpec("watch", TaskType.BINARY), TaskSpec("like", TaskType.BINARY)]
        >>> model = PLE(8, num_shared_experts=2, num_task_experts=1, expert_hidden=[16], tasks=tasks)
        >>> out = model(torch.randn(4, 8))
        >>> out["like"].shape
        torch.Size([4, 16])
        >>> model.last_task_gates[0]["like"].shape, model.last_shared_gates[0].shape  # E_t+E_s=3, T*E_t+E_s=4
        (torch.Size([4, 3]), torch.Size([4, 4]))
    """

    def __init__(
        self,
        in_features: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: Sequence[int],
        tasks: Sequence[TaskSpec],
        num_levels: int = 2,
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if num_shared_experts < 0 or num_task_experts < 0 or num_shared_experts + num_task_experts < 1:
            raise ValueError(
                f"need >= 0 experts of each kind and >= 1 in all: shared={num_shared_experts}, task={num_task_experts}"
            )
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if not expert_hidden:
            raise ValueError("expert_hidden must name at least one layer")
        self.task_names: list[str] = validate_task_names(tasks)
        self.in_features = in_features
        self.output_dim: int = expert_hidden[-1]
        self.levels = nn.ModuleList(
            _CGCLevel(
                in_features if level == 0 else self.output_dim,
                self.task_names,
                num_shared_experts,
                num_task_experts,
                expert_hidden,
                with_shared_gate=level < num_levels - 1,
                activation=activation,
                dropout=dropout,
                device=device,
            )
            for level in range(num_levels)
        )
        self.last_task_gates: list[dict[str, torch.Tensor]] = []
        self.last_shared_gates: list[torch.Tensor] = []

    def reset_parameters(self) -> None:
        """Re-initialise experts and gates of every level."""
        _reset_linears(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the CGC levels bottom-up.

        Args:
            x: [B, F] dense input.

        Returns:
            task name -> [B, H], the last level's task representations.
        """
        _check_input(x, self.in_features)
        task_inputs = dict.fromkeys(self.task_names, x)
        shared_input = x
        task_gates: list[dict[str, torch.Tensor]] = []
        shared_gates: list[torch.Tensor] = []
        for level in self.levels:
            task_inputs, shared_out, gates, shared_weights = level(task_inputs, shared_input)
            task_gates.append({n: g.detach() for n, g in gates.items()})
            if shared_out is not None and shared_weights is not None:
                shared_input = shared_out
                shared_gates.append(shared_weights.detach())
        self.last_task_gates = task_gates
        self.last_shared_gates = shared_gates
        return task_inputs
