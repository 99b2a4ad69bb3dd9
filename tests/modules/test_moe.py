"""MoELayer: output contract, statistics, empty input, meta build, determinism, dense equivalence at E=1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.modules.experts import DenseFFN, ExpertImpl
from supermoe_rec.modules.moe import MoELayer, MoEOutput


def _layer(d: int = 16, num_tasks: int = 0, **overrides: object) -> MoELayer:
    cfg = dataclasses.replace(MoEConfig(num_experts=4, top_k=2, expert_hidden=32), **overrides)  # type: ignore[arg-type]
    return MoELayer(d, cfg, num_tasks=num_tasks)


@pytest.mark.parametrize("k", [1, 2])
def test_output_contract_and_statistics(k: int) -> None:
    torch.manual_seed(0)
    n, t = 120, 3
    layer = _layer(num_tasks=t, top_k=k, capacity_factor_train=0.75)
    task_ids = torch.randint(0, t, (n,))
    out = layer(torch.randn(n, 16), task_ids=task_ids)
    assert isinstance(out, MoEOutput)
    assert out.hidden.shape == (n, 16)
    assert out.balance_loss.shape == () and out.z_loss.shape == () and out.dropped_fraction.shape == ()
    assert out.tokens_per_expert.shape == (4,) and not out.tokens_per_expert.requires_grad
    assert out.task_expert_counts is not None and out.task_expert_counts.shape == (t, 4)
    assert int(out.tokens_per_expert.sum()) == n * k
    assert torch.equal(out.task_expert_counts.sum(dim=0), out.tokens_per_expert)
    # Each task's row counts k assignments per token of that task.
    assert out.task_expert_counts.sum(dim=1).tolist() == [k * int((task_ids == i).sum()) for i in range(t)]
    assert out.balance_loss.requires_grad and out.z_loss.requires_grad


def test_task_expert_counts_hand_checked() -> None:
    layer = _layer(d=4, num_tasks=2, num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))  # token i -> argmax of x_i
    x = torch.eye(4)[[0, 1, 1, 3, 0]]
    out = layer(x, task_ids=torch.tensor([0, 0, 1, 1, 1]))
    assert out.tokens_per_expert.tolist() == [2, 2, 0, 1]
    assert out.task_expert_counts is not None
    assert out.task_expert_counts.tolist() == [[1, 1, 0, 0], [1, 1, 0, 1]]


def test_task_expert_counts_none_without_tasks() -> None:
    x = torch.randn(10, 16)
    assert _layer(num_tasks=3)(x).task_expert_counts is None
    assert _layer(num_tasks=0)(x, task_ids=torch.zeros(10, dtype=torch.long)).task_expert_counts is None


def test_rejects_out_of_range_task_ids() -> None:
    with pytest.raises(ValueError, match="task_ids"):
        _layer(num_tasks=2)(torch.randn(3, 16), task_ids=torch.tensor([0, 1, 2]))


def test_dropped_tokens_pass_zero_and_fraction_matches() -> None:
    torch.manual_seed(0)
    n = 64
    layer = _layer(top_k=1, capacity_factor_train=0.5)
    with torch.no_grad():
        layer.router.weight.mul_(30.0)  # skewed routing, so capacity 8 per expert overflows
        layer.experts.b2.fill_(1.0)  # kept tokens are nonzero
    out = layer(torch.randn(n, 16))
    dropped_rows = (out.hidden == 0).all(dim=1)
    assert 0 < int(dropped_rows.sum()) < n
    # k = 1: dropped assignments == dropped tokens.
    assert out.dropped_fraction.item() == pytest.approx(dropped_rows.float().mean().item())


def test_dropless_drops_nothing() -> None:
    torch.manual_seed(0)
    layer = _layer(top_k=2, dropless=True)
    with torch.no_grad():
        layer.router.weight.mul_(30.0)
    out = layer(torch.randn(64, 16))
    assert out.dropped_fraction.item() == 0.0
    assert bool((out.hidden != 0).any(dim=1).all())


@pytest.mark.parametrize("impl", list(ExpertImpl))
def test_empty_input(impl: ExpertImpl) -> None:
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2), num_tasks=2, impl=impl)
    out = layer(torch.randn(0, 16), task_ids=torch.zeros(0, dtype=torch.long))
    assert out.hidden.shape == (0, 16)
    assert out.balance_loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.dropped_fraction.item() == 0.0
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert out.task_expert_counts is not None and out.task_expert_counts.tolist() == [[0] * 4] * 2
    (out.hidden.sum() + out.balance_loss + out.z_loss).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in layer.parameters())


def test_single_expert_equals_dense_ffn() -> None:
    # E = 1, K = 1: softmax over one expert gives gate exactly 1, so the layer is a dense FFN.
    torch.manual_seed(0)
    layer = _layer(d=8, num_experts=1, top_k=1, expert_hidden=24)
    dense = DenseFFN(8, 24)
    with torch.no_grad():
        dense.w1.copy_(layer.experts.w1[0])
        dense.b1.copy_(layer.experts.b1[0])
        dense.w2.copy_(layer.experts.w2[0])
        dense.b2.copy_(layer.experts.b2[0])
    x = torch.randn(10, 8)
    out = layer(x)
    torch.testing.assert_close(out.hidden, dense(x))
    assert out.dropped_fraction.item() == 0.0
    assert out.balance_loss.item() == pytest.approx(1.0)


def test_builds_on_meta_and_materialises() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=32)
    meta = MoELayer(16, cfg, num_tasks=2, device=torch.device("meta"))
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device=torch.device("cpu"))
    torch.manual_seed(5)
    meta.reset_parameters()
    torch.manual_seed(5)
    ref = MoELayer(16, cfg, num_tasks=2)
    assert meta.state_dict().keys() == ref.state_dict().keys()
    for name, value in ref.state_dict().items():
        assert torch.equal(meta.state_dict()[name], value), name
    assert meta(torch.randn(5, 16)).hidden.shape == (5, 16)


def test_seeded_determinism_with_router_noise() -> None:
    def run() -> MoEOutput:
        torch.manual_seed(42)
        layer = _layer(router_jitter=0.1, router_noise=0.5)
        return layer(torch.randn(50, 16))

    a, b = run(), run()
    assert torch.equal(a.hidden, b.hidden)
    assert torch.equal(a.balance_loss, b.balance_loss) and torch.equal(a.z_loss, b.z_loss)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)


def test_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match="x must be"):
        _layer()(torch.randn(3, 8))
