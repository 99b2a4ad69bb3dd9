"""The MoE recipe at layer level: shared experts, bias balancing in a training loop, diagnostics, the shape helper."""

from __future__ import annotations

import math

import pytest
import torch

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.modules.experts import DenseFFN, ExpertImpl
from supermoe_rec.modules.gating import update_router_biases
from supermoe_rec.modules.moe import MoELayer
from supermoe_rec.modules.moe_recipe import active_params, choose_expert_shape, dense_hidden_for, total_params
from supermoe_rec.modules.moe_stats import DEAD_FRACTION, read_stats, set_collect_stats, tensorboard_scalars


def _cfg(**kw: object) -> MoEConfig:
    base: dict[str, object] = {"num_experts": 4, "top_k": 2, "expert_hidden": 8}
    base.update(kw)
    return MoEConfig(**base)  # type: ignore[arg-type]


def test_shared_experts_are_a_dense_ffn_added_to_the_routed_output() -> None:
    torch.manual_seed(0)
    layer = MoELayer(6, _cfg(num_shared_experts=2, dropless=True))
    assert isinstance(layer.shared, DenseFFN) and layer.shared.hidden == 2 * 8
    with torch.no_grad():
        layer.shared.b2.normal_()
    x = torch.randn(10, 6)
    out = layer(x)
    routed = layer.experts(x, layer.router(x).plan)
    torch.testing.assert_close(out.hidden, routed + layer.shared(x))
    # Every token gets the shared experts, even one whose routed assignments were all dropped.
    layer_cap = MoELayer(6, _cfg(num_shared_experts=1, capacity_factor_train=0.01))
    y = layer_cap(x)
    assert float(y.dropped_fraction) > 0 and bool((y.hidden != 0).any(dim=1).all())


def test_default_layer_has_no_shared_experts_and_keeps_its_state_keys() -> None:
    layer = MoELayer(6, _cfg())
    assert layer.shared is None
    assert sorted(layer.state_dict()) == ["experts.b1", "experts.b2", "experts.w1", "experts.w2", "router.weight"]
    biased = MoELayer(6, _cfg(load_balance="bias", num_shared_experts=1))
    assert {"router.expert_bias", "shared.w1"} <= set(biased.state_dict())


def test_shared_and_bias_fast_path_matches_reference() -> None:
    torch.manual_seed(0)
    cfg = _cfg(num_experts=6, top_k=3, num_shared_experts=1, load_balance="bias", score_func="sigmoid", dropless=True)
    fast = MoELayer(6, cfg, num_tasks=3)
    ref = MoELayer(6, cfg, num_tasks=3, impl=ExpertImpl.REFERENCE)
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 6))  # type: ignore[union-attr]
        ref.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 6))  # type: ignore[union-attr]
    x = torch.randn(25, 6)
    kinds = torch.randint(0, 3, (25,))
    outs = []
    for layer in (fast, ref):
        xx = x.clone().requires_grad_(True)
        out = layer(xx, task_ids=kinds)
        (out.hidden.pow(2).sum() + out.z_loss).backward()
        outs.append((out.hidden.detach(), xx.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in outs[1][2].items():
        torch.testing.assert_close(outs[0][2][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_bias_balancing_in_a_training_loop_beats_no_balancing() -> None:
    """A few hundred SGD steps on a task that favours one expert: bias balancing ends far more even than none."""

    def train(balance: str) -> float:
        torch.manual_seed(0)
        layer = MoELayer(8, _cfg(num_experts=8, top_k=2, load_balance=balance, bias_update_rate=0.01, dropless=True))
        with torch.no_grad():
            layer.router.weight[0] += 0.5
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        x = torch.randn(256, 8) + 0.3
        for _ in range(150):
            out = layer(x)
            loss = (out.hidden - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_router_biases(layer)
        counts = layer(x).tokens_per_expert.float()
        return float(counts.max() / counts.mean())

    none, bias = train("none"), train("bias")
    assert bias < 1.3 < none, (bias, none)


def test_diagnostics_load_dead_experts_activity_and_entropy_per_kind() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, _cfg(num_experts=4, top_k=1, dropless=True), num_tasks=3)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 20.0  # tokens with x[0] > 0 go to expert 0 with near-certainty
    x = torch.randn(64, 8)
    x[:, 0] = x[:, 0].abs() + 0.5  # all of them
    kinds = torch.tensor([0, 1, 2, 2] * 16)
    assert set_collect_stats(layer, True) == 1
    layer(x, task_ids=kinds)
    layer(x, task_ids=kinds)
    (stats,) = read_stats(layer, kind_labels=["[USER]", "watch", "history"])
    assert stats["load"] == [128.0, 0.0, 0.0, 0.0] and stats["forwards"] == 2
    assert stats["dead_experts"] == 3 and stats["dead_threshold"] == DEAD_FRACTION
    assert stats["max_load_over_uniform"] == pytest.approx(4.0)
    assert 0.0 < stats["zero_activation_fraction"] < 1.0
    assert set(stats["routing_entropy"]) == {"[USER]", "watch", "history"}
    assert all(v is not None and 0.0 <= v < 0.01 for v in stats["routing_entropy"].values())  # confident routing
    assert stats["routing_entropy_uniform"] == pytest.approx(math.log(4))
    scalars = tensorboard_scalars([stats])
    assert scalars["moe/layer0/dead_experts"] == 3.0 and scalars["moe/layer0/load/e0"] == 1.0
    assert "moe/layer0/entropy/watch" in scalars
    # Reset after reading; collection off means nothing accumulates.
    set_collect_stats(layer, False)
    layer(x, task_ids=kinds)
    assert read_stats(layer)[0]["forwards"] == 0


def test_uniform_router_has_maximal_entropy() -> None:
    layer = MoELayer(8, _cfg(num_experts=4, top_k=2), num_tasks=2)
    with torch.no_grad():
        layer.router.weight.zero_()
    set_collect_stats(layer, True)
    layer(torch.randn(20, 8), task_ids=torch.zeros(20, dtype=torch.long))
    (stats,) = read_stats(layer, kind_labels=["a", "b"])
    assert stats["routing_entropy"]["a"] == pytest.approx(math.log(4), abs=1e-6)
    assert stats["routing_entropy"]["b"] is None  # no token of that kind


def test_choose_expert_shape_hits_the_target_and_counts_match_the_layer() -> None:
    d, target = 64, active_params(64, 8, 2, 128)
    for e in (4, 16, 64):
        for s in (0, 1):
            shape = choose_expert_shape(d, target, e, num_shared=s)
            assert abs(shape.active - target) / target < 0.02, shape.describe()
            assert shape.top_k == max(1, round(math.sqrt(e) / 2))
            layer = MoELayer(d, _cfg(num_experts=e, top_k=shape.top_k, expert_hidden=shape.expert_hidden,
                                     num_shared_experts=s))  # fmt: skip
            assert (
                sum(p.numel() for p in layer.parameters()) == shape.total == total_params(d, e, shape.expert_hidden, s)
            )
    totals = [choose_expert_shape(d, target, e).total for e in (4, 16, 64)]
    assert totals == sorted(totals) and totals[-1] > 3 * totals[0]  # fine-grained arms still grow in parameters
    assert "E=16 K=2" in choose_expert_shape(d, target, 16).describe()
    assert choose_expert_shape(d, target, 8, top_k=2).expert_hidden == 128  # today's default is its own answer
    assert dense_hidden_for(d, 2 * d * 256 + 256 + d) == 256
    with pytest.raises(ValueError, match="router"):
        choose_expert_shape(d, 1000, 64)
