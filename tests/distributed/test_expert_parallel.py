"""Expert parallelism: a real 2-process gloo run against the 1-process MoELayer on the same global batch.

Convention under test (see ``supermoe_rec.distributed.expert_parallel``): rank r's loss is
``L_r = W * (its share of the task loss) + a * balance_loss + b * z_loss`` with global aux losses, so
``mean_r L_r`` is the 1-process loss. DDP averages the router gradient; expert gradients are scaled by 1/W inside
the layer. Hence, compared with the 1-process run on the concatenated batch:

- ``mean_r L_r``, every rank's ``balance_loss`` / ``z_loss`` and the routing statistics equal the 1-process values;
- the router gradient (after DDP) and every expert's gradient (each rank's slice, concatenated) equal them;
- the input gradient on rank r is ``W x`` the 1-process gradient of its tokens (the same factor plain data
  parallelism gives activations under this loss convention).

The recipe cases (:data:`RECIPE_CASES`) run the same checks with one shared expert, sigmoid scores and bias
balancing (a nonzero bias, so it changes the choices): the shared expert's gradient (replicated, DDP-averaged)
equals the 1-process one, and after :func:`~supermoe_rec.modules.gating.update_router_biases` (one all-reduce of
the ranks' loads) every rank holds the bias the 1-process layer moves to.

All to 1e-5. The equivalence cases never drop (dropless, or capacity factor E so that C = N): with a capacity, the
drop decisions are made per rank from the rank's *local* token count, so once tokens drop, the 2-rank layer equals
the 1-process layer applied to each rank's tokens separately, not to the global batch (checked separately).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.distributed.expert_parallel import (
    ExpertParallelExperts,
    expert_parallel_parameter_names,
    local_expert_range,
    parallelize_experts,
)
from supermoe_rec.modules.experts import BatchedExperts
from supermoe_rec.modules.gating import update_router_biases
from supermoe_rec.modules.moe import MoELayer

from ..dist_utils import run_distributed

W, E, D, H, T, N_G = 2, 4, 8, 16, 3, 20
BALANCE_W, Z_W = 0.5, 0.1
SPLITS = {"even": 10, "uneven": 7, "empty": 0}  # tokens on rank 1; rank 0 gets the rest
CASES = list(itertools.product([1, 2], ["dropless", "capacity"], list(SPLITS)))
TOL = 1e-5  # atol and rtol
# (top_k, mode, split) run with the recipe: one shared expert, sigmoid scores, bias balancing.
RECIPE_CASES = [(2, "dropless", "uneven"), (2, "capacity", "even"), (1, "dropless", "empty")]
START_BIAS = torch.tensor([0.05, -0.05, 0.02, 0.0])  # large enough to change some sigmoid top-k choices


def _config(top_k: int, mode: str, num_experts: int = E, recipe: bool = False) -> MoEConfig:
    # Capacity factor E gives C = min(ceil(E * N * K / E), N) = N: nothing can drop.
    cf = float(num_experts) if mode == "capacity" else 1.0
    extra: dict[str, Any] = (
        {"num_shared_experts": 1, "score_func": "sigmoid", "load_balance": "bias", "bias_update_rate": 0.01}
        if recipe
        else {}
    )
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=H,
        capacity_factor_train=cf,
        dropless=mode == "dropless",
        **extra,
    )


def _data(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_G, D, generator=g)
    target = torch.randn(N_G, D, generator=g)
    task_ids = torch.randint(0, T, (N_G,), generator=g)
    return x, target, task_ids


def _rank_slice(rank: int, split: str, n: int = N_G) -> slice:
    n1 = SPLITS[split]
    return slice(0, n - n1) if rank == 0 else slice(n - n1, n)


def _full_layer(top_k: int, mode: str, recipe: bool = False) -> MoELayer:
    torch.manual_seed(1234)
    layer = MoELayer(D, _config(top_k, mode, recipe=recipe), num_tasks=T)
    if recipe:
        assert layer.router.expert_bias is not None
        layer.router.expert_bias.copy_(START_BIAS)
    return layer


def _expert_grads(layer: MoELayer) -> dict[str, Tensor | None]:
    return {f"experts.{n}": p.grad for n, p in layer.experts.named_parameters()}


def _recipe_state(layer: MoELayer) -> dict[str, Any]:
    """After backward: the shared expert's gradients, then one bias update (a collective under EP)."""
    if layer.shared is None:
        return {}
    shared = {n: None if p.grad is None else p.grad.clone() for n, p in layer.shared.named_parameters()}
    assert update_router_biases(layer) == 1
    assert layer.router.expert_bias is not None
    return {"shared_grads": shared, "bias_after": layer.router.expert_bias.clone()}


def _reference(top_k: int, mode: str, seed: int, recipe: bool = False) -> dict[str, Any]:
    """1-process run on the whole batch."""
    layer = _full_layer(top_k, mode, recipe)
    x, target, task_ids = _data(seed)
    x.requires_grad_(True)
    out = layer(x, task_ids=task_ids)
    loss = (out.hidden - target).pow(2).sum() / (N_G * D) + BALANCE_W * out.balance_loss + Z_W * out.z_loss
    loss.backward()
    return {
        "loss": loss.detach(),
        "balance": out.balance_loss.detach(),
        "z": out.z_loss.detach(),
        "tokens_per_expert": out.tokens_per_expert,
        "dropped": out.dropped_fraction,
        "task_expert_counts": out.task_expert_counts,
        "hidden": out.hidden.detach(),
        "x_grad": x.grad,
        "router_grad": layer.router.weight.grad,
        "expert_grads": _expert_grads(layer),
        **_recipe_state(layer),
    }


def _ep_case(rank: int, top_k: int, mode: str, split: str, seed: int, recipe: bool = False) -> dict[str, Any]:
    # The trainer's path: every rank builds the whole layer alike, then parallelize_experts keeps its slice.
    layer = parallelize_experts(_full_layer(top_k, mode, recipe))
    assert isinstance(layer, MoELayer) and isinstance(layer.experts, ExpertParallelExperts)
    # What DMP's DefaultDataParallelWrapper(params_to_ignore=...) does with the trainer's list.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # type: ignore[no-untyped-call]
        layer, expert_parallel_parameter_names(layer)
    )
    ddp = DistributedDataParallel(layer)  # broadcasts the router from rank 0, must leave the experts alone
    x, target, task_ids = _data(seed)
    sl = _rank_slice(rank, split)
    x_r = x[sl].clone().requires_grad_(True)
    out = ddp(x_r, task_ids=task_ids[sl])
    share = (out.hidden - target[sl]).pow(2).sum() / (N_G * D)
    loss = W * share + BALANCE_W * out.balance_loss + Z_W * out.z_loss
    loss.backward()
    return {
        "loss": loss.detach(),
        "balance": out.balance_loss.detach(),
        "z": out.z_loss.detach(),
        "tokens_per_expert": out.tokens_per_expert,
        "dropped": out.dropped_fraction,
        "task_expert_counts": out.task_expert_counts,
        "hidden": out.hidden.detach(),
        "x_grad": x_r.grad,
        "router_grad": layer.router.weight.grad,
        "expert_grads": _expert_grads(layer),
        **_recipe_state(layer),
    }


def _drop_case(rank: int, top_k: int) -> dict[str, Any]:
    """Capacity factor 0.5 (tokens drop): compare with the 1-process layer on this rank's tokens only."""
    cfg = dataclasses.replace(_config(top_k, "capacity"), capacity_factor_train=0.5)
    torch.manual_seed(0)
    layer = parallelize_experts(MoELayer(D, cfg, num_tasks=T))
    torch.manual_seed(0)
    local = MoELayer(D, cfg, num_tasks=T)
    x, _, _ = _data(7)
    sl = _rank_slice(rank, "uneven")
    out, ref = layer(x[sl]), local(x[sl])
    return {
        "hidden": out.hidden,
        "local_hidden": ref.hidden,
        "dropped": out.dropped_fraction,
        "n": x[sl].shape[0],
        "local_dropped": ref.dropped_fraction,
    }


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    results: dict[str, Any] = {"cases": {c: _ep_case(rank, *c, seed=i) for i, c in enumerate(CASES)}}
    results["recipe"] = {c: _ep_case(rank, *c, seed=100 + i, recipe=True) for i, c in enumerate(RECIPE_CASES)}
    results["drop"] = {k: _drop_case(rank, k) for k in (1, 2)}
    # Init: same seed -> this rank's experts are its slice of the 1-process layer's, and parallelizing draws no
    # random numbers (the RNG stream goes on as in a 1-process run); also after a meta build and reset.
    torch.manual_seed(0)
    layer = MoELayer(D, _config(2, "dropless"), num_tasks=T)
    rng = torch.get_rng_state()
    parallelize_experts(layer)
    results["rng_untouched"] = torch.equal(rng, torch.get_rng_state())
    results["init"] = layer.state_dict()
    meta = parallelize_experts(MoELayer(D, _config(2, "dropless"), num_tasks=T, device=torch.device("meta")))
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.reset_parameters()
    results["meta_init"] = meta.state_dict()
    results["param_names"] = expert_parallel_parameter_names(torch.nn.ModuleDict({"ffn": meta}))
    try:
        parallelize_experts(MoELayer(D, _config(2, "dropless", num_experts=3)))
        results["indivisible"] = None
    except ValueError as e:
        results["indivisible"] = str(e)
    # An explicit group (here a new group over both ranks) is honoured.
    group = dist.new_group([0, 1])
    ep = parallelize_experts(MoELayer(D, _config(1, "dropless")), group)
    results["group_ok"] = ep.experts.num_experts  # type: ignore[union-attr]
    return results


@pytest.fixture(scope="module")
def dist_results() -> list[dict[str, Any]]:
    return run_distributed(_worker, W)


@pytest.mark.parametrize(("top_k", "mode", "split"), CASES)
def test_two_ranks_match_one_process(dist_results: list[dict[str, Any]], top_k: int, mode: str, split: str) -> None:
    seed = CASES.index((top_k, mode, split))
    ref = _reference(top_k, mode, seed)
    ranks = [r["cases"][(top_k, mode, split)] for r in dist_results]
    _check_equivalence(ref, ranks, split)


@pytest.mark.parametrize(("top_k", "mode", "split"), RECIPE_CASES)
def test_two_ranks_match_one_process_with_shared_experts_and_bias(
    dist_results: list[dict[str, Any]], top_k: int, mode: str, split: str
) -> None:
    ref = _reference(top_k, mode, 100 + RECIPE_CASES.index((top_k, mode, split)), recipe=True)
    ranks = [r["recipe"][(top_k, mode, split)] for r in dist_results]
    _check_equivalence(ref, ranks, split)
    assert float(ref["balance"]) == 0.0  # bias balancing: no auxiliary loss
    assert not torch.equal(ref["bias_after"], START_BIAS)  # the update moved it
    for r in ranks:
        torch.testing.assert_close(r["bias_after"], ref["bias_after"], atol=TOL, rtol=TOL)  # global load, replicated
        assert r["shared_grads"].keys() == ref["shared_grads"].keys()
        for name, grad in ref["shared_grads"].items():
            torch.testing.assert_close(r["shared_grads"][name], grad, atol=TOL, rtol=TOL, msg=name)  # DDP-averaged


def _check_equivalence(ref: dict[str, Any], ranks: list[dict[str, Any]], split: str) -> None:
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"], atol=TOL, rtol=TOL)
    for r in ranks:
        torch.testing.assert_close(r["balance"], ref["balance"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(r["z"], ref["z"], atol=TOL, rtol=TOL)
        assert torch.equal(r["tokens_per_expert"], ref["tokens_per_expert"])
        assert torch.equal(r["task_expert_counts"], ref["task_expert_counts"])
        assert float(r["dropped"]) == float(ref["dropped"]) == 0.0
        torch.testing.assert_close(r["router_grad"], ref["router_grad"], atol=TOL, rtol=TOL)  # DDP-averaged
    torch.testing.assert_close(torch.cat([r["hidden"] for r in ranks]), ref["hidden"], atol=TOL, rtol=TOL)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), W * ref["x_grad"], atol=TOL, rtol=TOL)
    assert all(r["expert_grads"].keys() == ref["expert_grads"].keys() for r in ranks)
    for name, grad in ref["expert_grads"].items():
        gathered = torch.cat([r["expert_grads"][name] for r in ranks])  # rank r holds experts [r*E/W, (r+1)*E/W)
        assert torch.allclose(gathered, grad, atol=TOL, rtol=TOL), name
    if split == "empty":
        assert ranks[1]["hidden"].shape == (0, D) and ranks[1]["x_grad"].shape == (0, D)


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_drops_are_decided_per_rank(dist_results: list[dict[str, Any]], top_k: int) -> None:
    ranks = [r["drop"][top_k] for r in dist_results]
    for r in ranks:
        torch.testing.assert_close(r["hidden"], r["local_hidden"], atol=TOL, rtol=TOL)
    n_local = torch.tensor([float(r["n"]) for r in ranks])
    expected = (torch.stack([r["local_dropped"] for r in ranks]) * n_local).sum() / n_local.sum()
    assert float(expected) > 0  # the case really drops
    for r in ranks:
        torch.testing.assert_close(r["dropped"], expected, atol=TOL, rtol=TOL)


def test_same_seed_gives_the_sharded_one_process_init(dist_results: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    full = MoELayer(D, _config(2, "dropless"), num_tasks=T).state_dict()
    for rank, r in enumerate(dist_results):
        assert r["rng_untouched"]
        mine = local_expert_range(E, rank, W)
        for key in ("init", "meta_init"):
            state = r[key]
            assert state.keys() == full.keys()
            for name, value in full.items():
                expected = value[mine.start : mine.stop] if name.startswith("experts.") else value
                assert torch.equal(state[name], expected), (key, name)
    assert dist_results[0]["param_names"] == [f"ffn.experts.{n}" for n in ("w1", "b1", "w2", "b2")]


def test_indivisible_experts_and_explicit_group(dist_results: list[dict[str, Any]]) -> None:
    for r in dist_results:
        assert (
            r["indivisible"] is not None and "num_experts=3" in r["indivisible"] and "world_size=2" in r["indivisible"]
        )
        assert r["group_ok"] == E // W


def test_local_expert_range() -> None:
    assert local_expert_range(8, 1, 4) == range(2, 4)
    assert local_expert_range(4, 0, 1) == range(0, 4)
    with pytest.raises(ValueError, match="divisible"):
        local_expert_range(6, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        local_expert_range(4, 2, 2)


def test_the_layer_always_holds_every_expert_and_parallelizing_needs_a_group() -> None:
    assert not dist.is_initialized()
    layer = MoELayer(D, _config(2, "capacity"), num_tasks=T)
    assert type(layer.experts) is BatchedExperts and layer.experts.num_experts == E
    with pytest.raises(RuntimeError, match="initialised"):
        parallelize_experts(layer)
    with pytest.raises(RuntimeError, match="initialised"):
        ExpertParallelExperts(D, H, E)
