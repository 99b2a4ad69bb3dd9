"""BatchedExperts fast path vs reference loop, dropped-token zeros, gradient reach, cost, DenseFFN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.modules.experts import BatchedExperts, DenseFFN, ExpertImpl
from supermoe_rec.modules.gating import TopKRouter, make_dispatch_plan


def _run(
    router: TopKRouter, experts: BatchedExperts, x: torch.Tensor, r: torch.Tensor, impl: ExpertImpl
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of sum(out * r) w.r.t. x, the router weight and the expert weights."""
    for p in (*router.parameters(), *experts.parameters()):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    experts.impl = impl
    out = experts(x, router(x).plan)
    (out * r).sum().backward()
    grads = {"x": x.grad, "router": router.weight.grad}
    grads.update({name: p.grad for name, p in experts.named_parameters()})
    return out.detach(), {k: (torch.zeros(0) if g is None else g.clone()) for k, g in grads.items()}


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 12),
    h=st.integers(1, 12),
    e=st.integers(1, 16),
    k=st.integers(1, 2),
    dropless=st.booleans(),
    cf=st.sampled_from([0.5, 1.0, 1.25]),
    seed=st.integers(0, 2**16),
)
def test_fast_matches_reference(n: int, d: int, h: int, e: int, k: int, dropless: bool, cf: float, seed: int) -> None:
    k = min(k, e)
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=e, top_k=k, expert_hidden=h, capacity_factor_train=cf, dropless=dropless)
    router = TopKRouter(d, cfg)
    experts = BatchedExperts(d, h, e)
    with torch.no_grad():  # nonzero biases, so a slot mix-up cannot hide behind zeros
        experts.b1.normal_()
        experts.b2.normal_()
    x = torch.randn(n, d)
    r = torch.randn(n, d)
    out_fast, g_fast = _run(router, experts, x, r, ExpertImpl.FAST)
    out_ref, g_ref = _run(router, experts, x, r, ExpertImpl.REFERENCE)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_reference_matches_hand_computed_expert() -> None:
    torch.manual_seed(0)
    experts = BatchedExperts(4, 6, 3)
    x = torch.randn(2, 4)
    idx = torch.tensor([[2, 0], [1, 2]])
    gates = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    plan, _ = make_dispatch_plan(idx, gates, num_experts=3, capacity=2)

    def ffn(e: int, v: torch.Tensor) -> torch.Tensor:
        return F.gelu(v @ experts.w1[e] + experts.b1[e]) @ experts.w2[e] + experts.b2[e]

    expected = torch.stack([0.7 * ffn(2, x[0]) + 0.3 * ffn(0, x[0]), 0.4 * ffn(1, x[1]) + 0.6 * ffn(2, x[1])])
    for impl in ExpertImpl:
        experts.impl = impl
        torch.testing.assert_close(experts(x, plan), expected)


@pytest.mark.parametrize("impl", list(ExpertImpl))
def test_dropped_tokens_give_exact_zero(impl: ExpertImpl) -> None:
    torch.manual_seed(0)
    experts = BatchedExperts(8, 16, 2, impl=impl)
    with torch.no_grad():
        experts.b2.fill_(1.0)  # kept tokens would be nonzero even with a tiny input
    idx = torch.tensor([[0], [0], [0], [1], [0]])  # expert 0 gets tokens 0, 1, 2, 4; capacity 2
    plan, _ = make_dispatch_plan(idx, torch.ones(5, 1), num_experts=2, capacity=2)
    y = experts(torch.randn(5, 8), plan)
    assert plan.kept[:, 0].tolist() == [True, True, False, True, False]
    assert torch.equal(y[2], torch.zeros(8)) and torch.equal(y[4], torch.zeros(8))
    assert bool((y[[0, 1, 3]] != 0).any(dim=1).all())


def test_gradients_reach_every_expert() -> None:
    torch.manual_seed(0)
    n, d, e = 256, 16, 8
    router = TopKRouter(d, MoEConfig(num_experts=e, top_k=2))
    experts = BatchedExperts(d, 32, e)
    x = torch.randn(n, d)
    experts(x, router(x).plan).pow(2).sum().backward()
    assert experts.w1.grad is not None and experts.w2.grad is not None
    assert (experts.w1.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert (experts.w2.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert router.weight.grad is not None and (router.weight.grad.abs().sum(dim=1) > 0).all()


def _expert_matmul_flops(module: torch.nn.Module, *args: object) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*args)
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if "mm" in str(op))


def test_expert_compute_independent_of_num_experts() -> None:
    # Not a timing test: counts matmul FLOPs. With capacity, E*C ~= cf*N*K, so the [E, C, D] buffer and the
    # expert FLOPs stay flat as E grows at fixed N, K, cf; only parameters grow.
    n, d, h, k, cf = 1024, 8, 16, 2, 1.25
    x = torch.randn(n, d)
    dense_flops = _expert_matmul_flops(DenseFFN(d, k * h), x)
    assert dense_flops == 2 * n * d * (k * h) * 2
    for e in (4, 16, 64, 256):
        plan, _ = make_dispatch_plan(torch.randint(0, e, (n, 1)).repeat(1, k), torch.ones(n, k), e, None)
        capacity = math.ceil(cf * n * k / e)
        plan = plan._replace(capacity=capacity, kept=plan.position < capacity, dropless=False)
        experts = BatchedExperts(d, h, e)
        buf = experts.dispatch(x, plan)
        assert buf.shape == (e, capacity, d)
        assert cf * n * k <= buf.shape[0] * buf.shape[1] <= cf * n * k + e
        flops = _expert_matmul_flops(experts, x, plan)
        assert flops == 2 * (e * capacity) * d * h * 2
        assert flops <= (cf + e / (n * k)) * dense_flops


def test_builds_on_meta_and_materialises() -> None:
    meta = BatchedExperts(8, 16, 4, device=torch.device("meta"))
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device=torch.device("cpu"))
    torch.manual_seed(1)
    meta.reset_parameters()
    torch.manual_seed(1)
    ref = BatchedExperts(8, 16, 4)
    for (name, a), (_, b) in zip(meta.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(meta.b1, torch.zeros(4, 16))
    assert meta.w1.std().item() == pytest.approx(1 / math.sqrt(8), rel=0.15)

    dense = DenseFFN(8, 32, device=torch.device("meta"))
    assert all(p.is_meta for p in dense.parameters())
    dense.to_empty(device=torch.device("cpu"))
    dense.reset_parameters()
    assert dense(torch.randn(3, 8)).shape == (3, 8)


def test_dense_ffn_matches_single_expert() -> None:
    torch.manual_seed(0)
    dense = DenseFFN(8, 32)
    experts = BatchedExperts(8, 32, 1)
    with torch.no_grad():
        experts.w1.copy_(dense.w1.unsqueeze(0))
        experts.b1.copy_(dense.b1.unsqueeze(0))
        experts.w2.copy_(dense.w2.unsqueeze(0))
        experts.b2.copy_(dense.b2.unsqueeze(0))
    x = torch.randn(6, 8)
    plan, _ = make_dispatch_plan(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), 1, None)
    torch.testing.assert_close(experts(x, plan), dense(x))
    torch.testing.assert_close(dense(x), F.gelu(x @ dense.w1 + dense.b1) @ dense.w2 + dense.b2)


# ---------------------------------------------------------------------------------------------------------------
# The dropless fast path: sorted rows, grouped matmul by padded bmm or segment loop; the reference loop is the oracle.


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 10),
    h=st.integers(1, 10),
    e=st.integers(1, 40),
    k=st.integers(1, 4),
    sigmoid=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dropless_backends_match_reference(n: int, d: int, h: int, e: int, k: int, sigmoid: bool, seed: int) -> None:
    from supermoe_rec.modules.experts import GroupedBackend

    k = min(k, e)
    torch.manual_seed(seed)
    score = "sigmoid" if sigmoid else "softmax"
    cfg = MoEConfig(num_experts=e, top_k=k, expert_hidden=h, dropless=True, score_func=score)  # type: ignore[call-arg]
    router = TopKRouter(d, cfg)
    experts = BatchedExperts(d, h, e)
    with torch.no_grad():
        experts.b1.normal_()
        experts.b2.normal_()
    x, r = torch.randn(n, d), torch.randn(n, d)
    out_ref, g_ref = _run(router, experts, x, r, ExpertImpl.REFERENCE)
    for backend in (GroupedBackend.BMM, GroupedBackend.LOOP, GroupedBackend.AUTO):
        experts.grouped_backend = backend
        out, g = _run(router, experts, x, r, ExpertImpl.FAST)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5, msg=backend.value)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=f"{backend.value}: {name}")


def test_auto_backend_on_cpu_is_loop_for_few_experts_else_bmm() -> None:
    from supermoe_rec.modules.experts import LOOP_MAX_EXPERTS, GroupedBackend, grouped_backend

    x = torch.zeros(3, 4)
    assert grouped_backend(GroupedBackend.AUTO, LOOP_MAX_EXPERTS, x) is GroupedBackend.LOOP
    assert grouped_backend(GroupedBackend.AUTO, LOOP_MAX_EXPERTS + 1, x) is GroupedBackend.BMM
    assert grouped_backend(GroupedBackend.BMM, 2, x) is GroupedBackend.BMM


@pytest.mark.parametrize("dropless", [False, True])
def test_activity_counts_real_rows_only(dropless: bool) -> None:
    """The zero-activation statistic counts non-positive pre-activations of real assignments, never padding."""
    torch.manual_seed(0)
    n, d, h, e, k = 50, 8, 16, 4, 2
    router = TopKRouter(d, MoEConfig(num_experts=e, top_k=k, expert_hidden=h, dropless=dropless))
    experts = BatchedExperts(d, h, e)
    with torch.no_grad():
        experts.b1.fill_(-0.3)  # padding rows would count as all-inactive (zero input, negative bias)
    x = torch.randn(n, d)
    plan = router(x).plan
    experts.collect_stats = True
    experts(x, plan)
    assert experts.last_activity is not None
    inactive, seen = experts.last_activity
    token, choice = plan.kept.nonzero(as_tuple=True)
    chosen = plan.expert_index[token, choice]  # (M,)
    pre = torch.stack([x[t] @ experts.w1[e] + experts.b1[e] for t, e in zip(token, chosen, strict=True)])
    assert seen == pre.numel()
    assert int(inactive) == int((pre <= 0).sum())
