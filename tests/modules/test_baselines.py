"""Tests for the Shared-Bottom, MMoE and PLE backbones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from supermoe_rec.config.experiment import TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.modules.baselines import PLE, MMoE, SharedBottom

TASKS = [TaskSpec("watch", TaskType.BINARY), TaskSpec("like", TaskType.BINARY), TaskSpec("rating", TaskType.REGRESSION)]


def _mixture(gate: nn.Module, gate_input: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Reference gated sum, written as an explicit loop over experts."""
    weights = torch.softmax(gate(gate_input), dim=-1)
    return sum((weights[:, e : e + 1] * out for e, out in enumerate(experts)), torch.zeros_like(experts[0]))


def test_shared_bottom() -> None:
    torch.manual_seed(0)
    model = SharedBottom(6, [8, 5], TASKS)
    x = torch.randn(4, 6)
    out = model(x)
    assert model.output_dim == 5 and list(out) == ["watch", "like", "rating"]
    assert out["watch"] is out["like"] is out["rating"]
    assert torch.equal(out["watch"], model.bottom(x))


def test_mmoe_matches_reference_mixture() -> None:
    torch.manual_seed(0)
    model = MMoE(6, num_experts=3, expert_hidden=[8, 5], tasks=TASKS).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    out = model(x)
    experts = [expert(x) for expert in model.experts]
    for name in ("watch", "like", "rating"):
        assert out[name].shape == (4, 5)
        torch.testing.assert_close(out[name], _mixture(model.gates[name], x, experts), rtol=0, atol=1e-12)
        gates = model.last_gate_weights[name]
        assert gates.shape == (4, 3) and not gates.requires_grad
        torch.testing.assert_close(gates.sum(-1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # Different tasks mix differently.
    assert not torch.equal(out["watch"], out["like"])


def test_mmoe_single_expert_is_that_expert() -> None:
    torch.manual_seed(0)
    model = MMoE(6, num_experts=1, expert_hidden=[5], tasks=TASKS)
    x = torch.randn(4, 6)
    out = model(x)
    assert torch.equal(out["rating"], model.experts[0](x))


def test_ple_single_level_matches_reference() -> None:
    torch.manual_seed(0)
    model = PLE(6, num_shared_experts=2, num_task_experts=2, expert_hidden=[5], tasks=TASKS, num_levels=1).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    out = model(x)
    (level,) = model.levels
    assert level.shared_gate is None  # the only level is the last: nothing above reads a shared output
    shared = [expert(x) for expert in level.shared_experts]
    for name in ("watch", "like", "rating"):
        own = [expert(x) for expert in level.task_experts[name]]
        torch.testing.assert_close(out[name], _mixture(level.task_gates[name], x, own + shared), rtol=0, atol=1e-12)
        assert model.last_task_gates[0][name].shape == (4, 4)  # K + S
    assert model.last_shared_gates == []


def test_ple_levels_and_gate_shapes() -> None:
    torch.manual_seed(0)
    model = PLE(6, num_shared_experts=2, num_task_experts=1, expert_hidden=[8, 5], tasks=TASKS, num_levels=3)
    out = model(torch.randn(4, 6))
    assert model.output_dim == 5 and {k: tuple(v.shape) for k, v in out.items()} == {
        "watch": (4, 5),
        "like": (4, 5),
        "rating": (4, 5),
    }
    assert [level.shared_gate is not None for level in model.levels] == [True, True, False]
    # Level 0 reads x (F=6); later levels read the previous level's H=5 outputs.
    assert [level.task_gates["like"].in_features for level in model.levels] == [6, 5, 5]
    assert [tuple(g["watch"].shape) for g in model.last_task_gates] == [(4, 3)] * 3  # K + S = 1 + 2
    assert [tuple(g.shape) for g in model.last_shared_gates] == [(4, 5)] * 2  # T*K + S = 3 + 2


def test_ple_task_isolation_within_a_level_and_sharing_across_levels() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    # One level: task watch never reads task like's experts.
    one = PLE(6, num_shared_experts=1, num_task_experts=1, expert_hidden=[5], tasks=TASKS, num_levels=1)
    one(x)["watch"].sum().backward()
    assert all(p.grad is None for p in one.levels[0].task_experts["like"].parameters())
    assert all(p.grad is not None for p in one.levels[0].shared_experts.parameters())
    # Two levels: the level-0 shared gate mixes every expert, so like's level-0 experts reach watch's output.
    two = PLE(6, num_shared_experts=1, num_task_experts=1, expert_hidden=[5], tasks=TASKS, num_levels=2)
    two(x)["watch"].sum().backward()
    like_grads = [p.grad for p in two.levels[0].task_experts["like"].parameters()]
    assert all(g is not None and bool((g != 0).any()) for g in like_grads)
    assert all(p.grad is None for p in two.levels[1].task_experts["like"].parameters())


def test_ple_without_shared_experts() -> None:
    model = PLE(6, num_shared_experts=0, num_task_experts=2, expert_hidden=[5], tasks=TASKS)
    assert model(torch.randn(3, 6))["like"].shape == (3, 5)
    assert model.last_task_gates[-1]["like"].shape == (3, 2)


def test_meta_construction_matches_cpu() -> None:
    builders: list[Callable[[torch.device | None], nn.Module]] = [
        lambda device: SharedBottom(6, [8, 5], TASKS, device=device),
        lambda device: MMoE(6, 3, [8, 5], TASKS, device=device),
        lambda device: PLE(6, 2, 1, [8, 5], TASKS, num_levels=2, device=device),
    ]
    for build in builders:
        on_meta = build(torch.device("meta"))
        assert all(p.is_meta for p in on_meta.parameters())
        on_meta.to_empty(device="cpu")
        torch.manual_seed(3)
        on_meta.reset_parameters()  # type: ignore[operator]
        on_cpu = build(None)
        torch.manual_seed(3)
        on_cpu.reset_parameters()  # type: ignore[operator]
        sa, sb = on_meta.state_dict(), on_cpu.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(6, 0, [5], TASKS)
    with pytest.raises(ValueError, match="expert_hidden"):
        MMoE(6, 2, [], TASKS)
    with pytest.raises(ValueError, match="shared=0, task=0"):
        PLE(6, 0, 0, [5], TASKS)
    with pytest.raises(ValueError, match="num_levels"):
        PLE(6, 1, 1, [5], TASKS, num_levels=0)
    with pytest.raises(ValueError, match=r"\[B, F=6\]"):
        SharedBottom(6, [5], TASKS)(torch.randn(3, 5))


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 6),
    features=st.integers(1, 6),
    expert_hidden=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    num_shared=st.integers(0, 2),
    num_task=st.integers(1, 2),
    num_levels=st.integers(1, 3),
    num_tasks=st.integers(1, 3),
)
def test_shapes_sweep(
    batch: int,
    features: int,
    expert_hidden: list[int],
    num_shared: int,
    num_task: int,
    num_levels: int,
    num_tasks: int,
) -> None:
    tasks = TASKS[:num_tasks]
    x = torch.randn(batch, features)
    models: list[nn.Module] = [
        SharedBottom(features, expert_hidden, tasks),
        MMoE(features, num_shared + num_task, expert_hidden, tasks),
        PLE(features, num_shared, num_task, expert_hidden, tasks, num_levels=num_levels),
    ]
    for model in models:
        out = model(x)
        assert [(k, tuple(v.shape)) for k, v in out.items()] == [(t.name, (batch, expert_hidden[-1])) for t in tasks]
