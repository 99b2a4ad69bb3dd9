"""Router and dispatch-plan invariants: top-k, gates, capacity, priority, aux losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.modules.gating import TopKRouter, compute_capacity, make_dispatch_plan


def _router(d: int, **overrides: object) -> TopKRouter:
    cfg = dataclasses.replace(MoEConfig(), **overrides)  # type: ignore[arg-type]
    return TopKRouter(d, cfg)


def _brute_force_positions(expert_index: torch.Tensor, num_experts: int) -> list[list[int]]:
    """Slot of every assignment by the documented priority: all top-1 choices first, then top-2, token order."""
    n, k = expert_index.shape
    pos = [[-1] * k for _ in range(n)]
    fill = [0] * num_experts
    for choice in range(k):
        for token in range(n):
            e = int(expert_index[token, choice])
            pos[token][choice] = fill[e]
            fill[e] += 1
    return pos


def test_compute_capacity_formula() -> None:
    assert compute_capacity(100, 8, 2, 1.25) == 32  # ceil(31.25)
    assert compute_capacity(64, 4, 1, 1.0) == 16
    assert compute_capacity(10, 1, 1, 2.0) == 10  # capped at N: an expert takes each token at most once
    assert compute_capacity(0, 4, 2, 1.25) == 0


def test_priority_top1_before_top2_then_token_order() -> None:
    # Expert 0 receives token 0's top-2 and the top-1 of tokens 1, 2: the top-1s win although token 0 is first.
    idx = torch.tensor([[1, 0], [0, 1], [0, 2]])
    plan, counts = make_dispatch_plan(idx, torch.full((3, 2), 0.5), num_experts=3, capacity=2)
    assert counts.tolist() == [3, 2, 1]
    assert plan.position.tolist() == [[0, 2], [0, 1], [1, 0]]
    assert plan.kept.tolist() == [[True, False], [True, True], [True, True]]
    assert plan.capacity == 2


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 30),
    e=st.integers(1, 8),
    k=st.integers(1, 2),
    capacity=st.one_of(st.none(), st.integers(0, 12)),
    seed=st.integers(0, 2**16),
)
def test_positions_match_brute_force(n: int, e: int, k: int, capacity: int | None, seed: int) -> None:
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.empty(0, k).long()
    plan, counts = make_dispatch_plan(idx, torch.ones(n, k), e, capacity)
    assert plan.position.tolist() == _brute_force_positions(idx, e)
    assert counts.tolist() == [int((idx == j).sum()) for j in range(e)]
    expected_c = (max(counts.tolist()) if n else 0) if capacity is None else capacity
    assert plan.capacity == expected_c
    assert torch.equal(plan.kept, plan.position < expected_c)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dropless", [False, True])
def test_routing_invariants(k: int, dropless: bool) -> None:
    torch.manual_seed(0)
    n, d, e = 200, 16, 8
    router = _router(d, num_experts=e, top_k=k, capacity_factor_train=0.75, dropless=dropless)
    # Scale the gate up so routing is skewed and some experts overflow.
    with torch.no_grad():
        router.weight.mul_(20.0)
    out = router(torch.randn(n, d))
    plan = out.plan
    assert plan.expert_index.shape == (n, k) and plan.gates.shape == (n, k)
    # At most k distinct experts per token (exactly k distinct: top-k never repeats).
    assert all(len(set(row)) == k for row in plan.expert_index.tolist())
    # Gates: the chosen experts' probabilities, renormalised for k >= 2, raw for k = 1 (Switch).
    chosen = out.probs.gather(1, plan.expert_index)
    if k == 1:
        torch.testing.assert_close(plan.gates, chosen)
        torch.testing.assert_close(plan.gates[:, 0], out.probs.max(dim=1).values)
    else:
        torch.testing.assert_close(plan.gates.sum(dim=1), torch.ones(n))
        torch.testing.assert_close(plan.gates, chosen / chosen.sum(dim=1, keepdim=True))
    # Per-expert kept count <= C, and kept slots are distinct and inside [0, C).
    kept_per_expert = torch.bincount(plan.expert_index[plan.kept], minlength=e)
    assert int(kept_per_expert.max()) <= plan.capacity
    slots = (plan.expert_index * plan.capacity + plan.position)[plan.kept]
    assert slots.unique().numel() == slots.numel()
    assert int(plan.position[plan.kept].max()) < plan.capacity
    assert int(out.tokens_per_expert.sum()) == n * k
    dropped = 1.0 - plan.kept.float().mean()
    torch.testing.assert_close(out.dropped_fraction, dropped)
    if dropless:
        assert bool(plan.kept.all()) and float(out.dropped_fraction) == 0.0
        assert plan.capacity == int(out.tokens_per_expert.max())
    else:
        assert plan.capacity == math.ceil(0.75 * n * k / e)
        assert float(out.dropped_fraction) > 0.0  # the skewed router overflows at cf 0.75


def test_train_and_eval_capacity_factors() -> None:
    n, e, k = 40, 4, 2
    router = _router(8, num_experts=e, top_k=k, capacity_factor_train=0.5, capacity_factor_eval=2.0)
    x = torch.randn(n, 8)
    router.train()
    assert router(x).plan.capacity == math.ceil(0.5 * n * k / e) == 10
    router.eval()
    assert router(x).plan.capacity == min(math.ceil(2.0 * n * k / e), n) == 40


def test_balance_loss_is_one_under_uniform_probs() -> None:
    # Zero gate: every probability is exactly 1/E, so E * sum_e f_e / E = sum_e f_e = 1 whatever the tie-break.
    router = _router(8, num_experts=4, top_k=2)
    with torch.no_grad():
        router.weight.zero_()
    out = router(torch.randn(32, 8))
    assert out.balance_loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_balance_loss_is_one_under_uniform_assignment(k: int) -> None:
    # Hand-set router: token i prefers expert i % E, then (i + 1) % E. Per-token probabilities are cyclic shifts of
    # one vector, so over a multiple of E tokens both f_e and P_e are exactly 1/E.
    e = 4
    router = _router(e, num_experts=e, top_k=k)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
    i = torch.arange(4 * e)
    x = 2.0 * torch.nn.functional.one_hot(i % e, e).float() + torch.nn.functional.one_hot((i + 1) % e, e).float()
    out = router(x)
    assert out.tokens_per_expert.tolist() == [4 * k] * e
    torch.testing.assert_close(out.balance_loss, torch.tensor(1.0))


def test_balance_loss_above_one_under_collapse() -> None:
    e, d = 4, 8
    router = _router(d, num_experts=e, top_k=1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0].fill_(5.0)
    out = router(torch.rand(64, d) + 0.5)  # positive inputs: expert 0 wins every token
    assert out.tokens_per_expert.tolist() == [64, 0, 0, 0]
    # f = (1, 0, 0, 0) so the loss is E * P_0, near E.
    torch.testing.assert_close(out.balance_loss, e * out.probs[:, 0].mean())
    assert out.balance_loss.item() > 3.9


def test_z_loss_hand_computed() -> None:
    router = _router(3, num_experts=3, top_k=1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))  # logits = x
    out = router(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse1 = math.log(3.0)
    assert out.z_loss.item() == pytest.approx((lse0**2 + lse1**2) / 2, rel=1e-6)


def test_noise_only_in_training() -> None:
    torch.manual_seed(0)
    noisy = _router(8, num_experts=4, top_k=2, router_jitter=0.2, router_noise=1.0)
    clean = _router(8, num_experts=4, top_k=2)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(50, 8)
    noisy.eval()
    clean.eval()
    assert torch.equal(noisy(x).probs, clean(x).probs)
    noisy.train()
    clean.train()
    assert not torch.allclose(noisy(x).probs, clean(x).probs)


def test_empty_input_gives_zero_losses_and_keeps_graph() -> None:
    router = _router(8, num_experts=4, top_k=2)
    out = router(torch.randn(0, 8))
    assert out.plan.expert_index.shape == (0, 2) and out.plan.capacity == 0
    assert out.balance_loss.item() == 0.0 and out.z_loss.item() == 0.0 and out.dropped_fraction.item() == 0.0
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 0]
    (out.balance_loss + out.z_loss).backward()
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) == 0.0


def test_rejects_bad_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        _router(8, num_experts=2, top_k=3)


def test_builds_on_meta_and_materialises() -> None:
    router = _router(8, num_experts=4, top_k=2)
    meta = TopKRouter(8, MoEConfig(num_experts=4, top_k=2), device=torch.device("meta"))
    assert meta.weight.is_meta
    meta.to_empty(device=torch.device("cpu"))
    torch.manual_seed(3)
    meta.reset_parameters()
    torch.manual_seed(3)
    router.reset_parameters()
    assert torch.equal(meta.weight, router.weight)


def test_kind_routers_start_at_shared_routing_and_add_a_per_kind_residual() -> None:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=4, top_k=2, task_routers=True)
    shared = TopKRouter(8, config).eval()
    kinded = TopKRouter(8, config, num_kinds=3).eval()
    assert kinded.kind_weight is not None and kinded.kind_weight.shape == (3, 4, 8)
    with torch.no_grad():
        kinded.weight.copy_(shared.weight)
    x, kinds = torch.randn(12, 8), torch.tensor([0, 1, 2] * 4)
    # Zero-initialised residuals: exactly the shared router.
    torch.testing.assert_close(kinded(x, kinds).probs, shared(x).probs, rtol=0, atol=0)
    with torch.no_grad():
        kinded.kind_weight.normal_()
    probs = kinded(x, kinds).probs
    for n in range(12):
        logits = x[n] @ (kinded.weight[0:4] + kinded.kind_weight[kinds[n]]).T  # hand-computed, token by token
        torch.testing.assert_close(probs[n], torch.softmax(logits, dim=-1))
    with pytest.raises(ValueError, match="needs kinds of shape"):
        kinded(x)


def test_task_routers_need_token_kinds() -> None:
    from supermoe_rec.modules.moe import MoELayer

    with pytest.raises(ValueError, match="task_routers needs the token kinds"):
        MoELayer(8, MoEConfig(num_experts=4, task_routers=True), num_tasks=0)
    layer = MoELayer(8, MoEConfig(num_experts=4, task_routers=True), num_tasks=3)
    with pytest.raises(ValueError, match="needs kinds"):
        layer(torch.randn(5, 8))


# ---------------------------------------------------------------------------------------------------------------
# The recipe: score_func, load_balance (aux_loss | bias | none).


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sigmoid_scores_normalise_the_top_k_weights(k: int) -> None:
    torch.manual_seed(0)
    router = _router(8, num_experts=6, top_k=k, score_func="sigmoid", dropless=True)
    x = torch.randn(40, 8)
    out = router(x)
    scores = torch.sigmoid(x @ router.weight.T)  # hand-computed
    idx = out.plan.expert_index
    assert torch.equal(idx, torch.topk(scores, k, dim=-1).indices)
    chosen = scores.gather(1, idx)
    expected = chosen if k == 1 else chosen / chosen.sum(dim=1, keepdim=True)
    torch.testing.assert_close(out.plan.gates, expected)
    torch.testing.assert_close(out.probs, scores / scores.sum(dim=1, keepdim=True))
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(40))


def test_bias_moves_selection_but_not_the_gate_weights() -> None:
    torch.manual_seed(0)
    plain = _router(8, num_experts=5, top_k=2, dropless=True)
    biased = _router(8, num_experts=5, top_k=2, dropless=True, load_balance="bias")
    biased.load_state_dict(plain.state_dict(), strict=False)
    assert biased.expert_bias is not None and "expert_bias" in biased.state_dict()
    assert "expert_bias" not in plain.state_dict()  # default checkpoints keep their keys
    x = torch.randn(30, 8)
    with torch.no_grad():
        biased.expert_bias[3] = 10.0  # far above any probability: expert 3 is always chosen
    out, ref = biased(x), plain(x)
    assert bool((out.plan.expert_index == 3).any(dim=1).all())
    probs = torch.softmax(x @ plain.weight.T, dim=-1)
    torch.testing.assert_close(out.probs, probs)  # scores are unbiased
    chosen = probs.gather(1, out.plan.expert_index)
    torch.testing.assert_close(out.plan.gates, chosen / chosen.sum(dim=1, keepdim=True))
    assert not torch.equal(out.plan.expert_index, ref.plan.expert_index)


@pytest.mark.parametrize("mode", ["bias", "none"])
def test_balance_loss_is_zero_without_aux_loss_and_the_task_loss_still_trains_the_router(mode: str) -> None:
    router = _router(8, num_experts=4, top_k=2, load_balance=mode)
    out = router(torch.randn(16, 8))
    assert out.balance_loss.item() == 0.0 and not out.balance_loss.requires_grad
    out.plan.gates.pow(2).sum().backward()
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0


def test_update_bias_moves_by_rate_towards_the_mean_load() -> None:
    router = _router(4, num_experts=4, top_k=1, load_balance="bias", bias_update_rate=0.01)
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    assert router.expert_bias is not None
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_pending_load_is_training_only_and_update_router_biases_consumes_it() -> None:
    from supermoe_rec.modules.gating import update_router_biases

    torch.manual_seed(0)
    model = torch.nn.ModuleList([_router(8, num_experts=4, top_k=2, load_balance="bias"), _router(8, num_experts=4)])
    biased = model[0]
    assert isinstance(biased, TopKRouter)
    biased.eval()
    biased(torch.randn(10, 8))
    assert biased.pending_load is None
    biased.train()
    out1, out2 = biased(torch.randn(10, 8)), biased(torch.randn(6, 8))
    assert biased.pending_load is not None
    torch.testing.assert_close(biased.pending_load, (out1.tokens_per_expert + out2.tokens_per_expert).float())
    assert update_router_biases(model) == 1  # the aux_loss router has no bias
    assert biased.pending_load is None
    assert biased.expert_bias is not None and float(biased.expert_bias.abs().sum()) > 0


def test_bias_balancing_evens_out_a_skewed_router() -> None:
    """Frozen router weights skewed towards expert 0: the bias alone must flatten the load (DeepSeek-V3's claim)."""
    from supermoe_rec.modules.gating import update_router_biases

    torch.manual_seed(0)
    e, d = 8, 16
    router = _router(d, num_experts=e, top_k=2, load_balance="bias", bias_update_rate=0.002, dropless=True)
    with torch.no_grad():
        router.weight[0] += 0.3  # with positive-mean inputs, expert 0 is everyone's favourite
    x = torch.randn(512, d) + 0.5

    def imbalance() -> float:
        counts = router(x).tokens_per_expert.float()
        return float(counts.max() / counts.mean())

    before = imbalance()
    router.pending_load = None
    for _ in range(300):
        router(x)
        update_router_biases(router)
    after = imbalance()
    assert before > 2.0, before
    assert after < 1.3, after
