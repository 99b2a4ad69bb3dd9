"""Tests for MLP, TaskTower and MultiTaskTowers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from supermoe_rec.config.experiment import TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.modules.towers import MLP, MultiTaskTowers, TaskTower, validate_task_names

WATCH = TaskSpec("watch", TaskType.BINARY)
RATING = TaskSpec("rating", TaskType.REGRESSION)
META = torch.device("meta")


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_mlp_layers_and_output_dim() -> None:
    torch.manual_seed(0)
    mlp = MLP(5, [7, 3], out_features=2)
    assert mlp.output_dim == 2
    assert [tuple(layer.weight.shape) for layer in mlp.hidden_layers] == [(7, 5), (3, 7)]
    assert mlp.output_layer is not None and tuple(mlp.output_layer.weight.shape) == (2, 3)
    x = torch.randn(4, 5)
    h = torch.relu(mlp.hidden_layers[1](torch.relu(mlp.hidden_layers[0](x))))
    assert torch.equal(mlp(x), mlp.output_layer(h))
    # Ending at a hidden layer: the activation is the last op.
    assert bool((MLP(5, [4])(x) >= 0).all())
    # Extra leading dims pass through.
    assert mlp(torch.randn(2, 3, 5)).shape == (2, 3, 2)


def test_mlp_without_layers_is_identity() -> None:
    mlp = MLP(5, [])
    x = torch.randn(3, 5)
    assert mlp.output_dim == 5 and list(mlp.parameters()) == []
    assert torch.equal(mlp(x), x)


def test_mlp_dropout_does_not_rename_parameters() -> None:
    with_dropout, without = MLP(5, [4, 3], out_features=1, dropout=0.5), MLP(5, [4, 3], out_features=1)
    assert with_dropout.state_dict().keys() == without.state_dict().keys()
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(16, 5)
    with_dropout.eval()
    assert torch.equal(with_dropout(x), without(x))
    with_dropout.train()
    torch.manual_seed(0)
    assert not torch.equal(with_dropout(x), without(x))


def test_mlp_rejects_bad_widths() -> None:
    with pytest.raises(ValueError, match="positive"):
        MLP(5, [0])
    with pytest.raises(ValueError, match="positive"):
        MLP(5, [3], out_features=0)


def test_task_tower_output_and_bias() -> None:
    torch.manual_seed(0)
    tower = TaskTower(6, [8, 4], RATING, output_bias=3.5)
    assert tower(torch.randn(5, 6)).shape == (5,)
    assert tower.head.bias.item() == 3.5
    # No hidden layers: a linear model w·x + b, squeezed.
    linear = TaskTower(6, [], WATCH, output_bias=-1.0)
    x = torch.randn(5, 6)
    assert torch.equal(linear(x), (x @ linear.head.weight.T + linear.head.bias).squeeze(-1))


def test_meta_construction_matches_cpu() -> None:
    tasks = [WATCH, RATING]
    builders = [
        lambda device: MLP(5, [4, 3], out_features=2, device=device),
        lambda device: TaskTower(5, [4], RATING, output_bias=2.0, device=device),
        lambda device: MultiTaskTowers(tasks, {"watch": 5, "rating": 3}, [4], {"rating": 3.0}, device=device),
    ]
    for build in builders:
        on_meta = build(META)
        assert all(p.is_meta for p in on_meta.parameters())
        on_meta.to_empty(device="cpu")
        torch.manual_seed(7)
        on_meta.reset_parameters()
        on_cpu = build(None)
        torch.manual_seed(7)
        on_cpu.reset_parameters()
        _assert_same_parameters(on_meta, on_cpu)
    towers = builders[2](None)
    assert isinstance(towers, MultiTaskTowers)
    assert towers.towers["rating"].head.bias.item() == 3.0 and towers.towers["watch"].head.bias.item() == 0.0


def test_multi_task_towers_shared_and_per_task_inputs() -> None:
    torch.manual_seed(0)
    tasks = [RATING, WATCH]
    shared = MultiTaskTowers(tasks, 6, [8])
    x = torch.randn(4, 6)
    out = shared(x)
    assert list(out) == ["rating", "watch"]  # task order, not alphabetical
    assert torch.equal(out["watch"], shared.towers["watch"](x))
    per_task = MultiTaskTowers(tasks, {"rating": 3, "watch": 6}, [8])
    inputs = {"rating": torch.randn(4, 3), "watch": x}
    out = per_task(inputs)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"rating": (4,), "watch": (4,)}
    assert torch.equal(out["rating"], per_task.towers["rating"](inputs["rating"]))
    with pytest.raises(KeyError, match="watch"):
        per_task({"rating": inputs["rating"]})


def test_towers_are_independent() -> None:
    torch.manual_seed(0)
    towers = MultiTaskTowers([WATCH, RATING], 6, [8])
    towers(torch.randn(4, 6))["watch"].sum().backward()
    assert all(p.grad is not None for p in towers.towers["watch"].parameters())
    assert all(p.grad is None for p in towers.towers["rating"].parameters())


def test_task_name_validation() -> None:
    assert validate_task_names([WATCH, RATING]) == ["watch", "rating"]
    with pytest.raises(ValueError, match="unique"):
        MultiTaskTowers([WATCH, WATCH], 4, [])
    with pytest.raises(ValueError, match="contain no"):
        MultiTaskTowers([TaskSpec("a.b", TaskType.BINARY)], 4, [])
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskTowers([], 4, [])
    with pytest.raises(ValueError, match=r"missing tasks \['rating'\]"):
        MultiTaskTowers([WATCH, RATING], {"watch": 4}, [])
    with pytest.raises(ValueError, match=r"output_bias: unknown tasks \['like'\]"):
        MultiTaskTowers([WATCH, RATING], 4, [], output_bias={"like": 1.0})


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 9),
    features=st.integers(1, 7),
    hidden=st.lists(st.integers(1, 6), max_size=3),
    num_tasks=st.integers(1, 3),
)
def test_shapes_sweep(batch: int, features: int, hidden: list[int], num_tasks: int) -> None:
    tasks = [TaskSpec(f"t{i}", TaskType.BINARY if i % 2 else TaskType.REGRESSION) for i in range(num_tasks)]
    out = MultiTaskTowers(tasks, features, hidden)(torch.randn(batch, features))
    assert [(k, tuple(v.shape)) for k, v in out.items()] == [(t.name, (batch,)) for t in tasks]
