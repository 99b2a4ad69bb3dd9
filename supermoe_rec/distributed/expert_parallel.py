"""Expert parallelism: the E experts of an MoE layer split across the P ranks of a process group.

Dimension letters: N tokens (this rank's), N_g tokens over all ranks, M model dim, H expert hidden, E experts (all
ranks), E_l = E / P experts per rank, P ranks in the expert group, K top-k, C capacity (slots per expert).

**Layout.** Rank r holds experts ``[r*E_l, (r+1)*E_l)`` (:func:`local_expert_range`). Routing stays local: every
rank routes its own tokens with its replica of the router and scatters them into the usual ``[E, C, M]`` buffer
(:meth:`~supermoe_rec.modules.experts.BatchedExperts.dispatch`). Because the experts are ordered by owner, that
buffer is already ``[P, E_l, C, M]``, block w being what rank w must receive. One ``all_to_all`` delivers to each
rank ``[P, E_l, C, M]`` (its E_l experts' slots from every rank), the experts run on ``[E_l, P*C, M]``, a second
``all_to_all`` sends the outputs home, and the combine is local. ``all_to_all_single`` needs one buffer shape on
all ranks, so C is agreed with an ``all_reduce(MAX)``:

- dropless: C = the global largest per-expert count, so nothing is dropped anywhere;
- with a capacity factor: every rank keeps the drop decisions its router made with C computed from its *local*
  token count (so they depend on how tokens are split over ranks, exactly as in GShard); the agreed C only pads.

**Gradient convention** (the one :class:`~supermoe_rec.objectives.task_indicator.TaskIndicatorLoss` uses). Each rank's
loss is
``L_r = P * (its share of the global loss)``, so ``mean_r L_r`` equals the single-process loss ``L`` on the
concatenated batch, and DDP's gradient *average* of the replicated (dense, router) parameters is the
single-process gradient. The all-to-alls here are autograd functions whose backward is the reverse all-to-all, so
rank r's backward computes, for every tensor it owns, the gradient of ``sum_s L_s = P * L``:

- activations (e.g. the layer input x): ``P * dL/dx``, as in any data-parallel run under this convention;
- replicated parameters: ``P * dL/dθ`` restricted to the rank's own tokens; DDP's average over the P ranks gives
  exactly ``dL/dθ``;
- expert parameters: ``P * dL/dφ`` (all P ranks' tokens reach them) and they are *not* averaged by DDP (they are
  not replicated, see :func:`expert_parallel_parameter_names`), so :class:`ExpertParallelExperts` multiplies their
  gradient by ``1/P`` (an identity op on the weights with gradient ``g/P``, in ``compute``). Their gradient then
  equals the single-process gradient of ``L``. (TorchRec's ``set_gradient_division(True)`` does the same for
  sharded embedding tables.) This requires the data-parallel group, the group whose size is the loss's
  ``world_size``, to be the expert group.

**Auxiliary losses** (:func:`globalize_router_output`). The load-balancing statistics are computed over the global
batch: ``f_e`` from all-reduced counts and ``P_e`` from an autograd-aware all-reduce of the probability sums; the
z-loss from an all-reduced sum of ``logsumexp^2`` and the global token count. Every rank then returns the global
value of both losses, so ``mean_r`` of them is the single-process value, and by the argument above (the backward
of the all-reduce sums all ranks' gradients) DDP's average gives the single-process router gradient. The routing
statistics (``tokens_per_expert``, ``dropped_fraction``, ``task_expert_counts``) are global too.

**Collectives.** Forward and backward issue collectives, so every rank of the group must call the layer the same
number of times, with the same arguments present (``task_ids`` given on all ranks or none), and back-propagate
through it (a rank with no tokens passes an empty ``[0, M]`` input). Collectives in forward: two small
``all_reduce`` (counts, capacity), one ``all_reduce`` of ``E+1`` floats, two ``all_to_all`` of ``E*C*M``; the same
``all_to_all`` and the ``E+1`` all-reduce again in backward.

**Wiring.** :class:`~supermoe_rec.modules.moe.MoELayer` always builds all E experts; expert parallelism is applied
from outside, to a built model (as torchtitan does): :func:`parallelize_experts` swaps every MoE layer's experts for
an :class:`ExpertParallelExperts` holding this rank's slice of the same weights, whose
:meth:`~ExpertParallelExperts.globalize` and :meth:`~ExpertParallelExperts.reduce_statistic` make the layer's losses
and statistics global. The trainer calls it when ``train.expert_parallel`` is set. A trainer must keep the expert
parameters out of DDP: pass :func:`expert_parallel_parameter_names` of the unwrapped model to
``DefaultDataParallelWrapper(params_to_ignore=...)`` (:func:`supermoe_rec.distributed.sharding.shard` does).
Checkpoints save each rank's expert slice as a ``DTensor`` sharded on dim 0 (:mod:`supermoe_rec.training.checkpoint`),
so
they reshard on load.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from supermoe_rec.modules.embeddings import scale_grad
from supermoe_rec.modules.experts import BatchedExperts, ExpertImpl
from supermoe_rec.modules.gating import DispatchPlan, RouterOutput
from supermoe_rec.modules.moe import MoELayer

__all__ = [
    "ExpertParallelExperts",
    "all_reduce_sum",
    "all_reduce_sum_no_grad",
    "all_to_all",
    "expert_parallel_parameter_names",
    "globalize_router_output",
    "local_expert_range",
    "parallelize_experts",
]

ProcessGroup = dist.ProcessGroup


# --------------------------------------------------------------------------------------------------------------
# Autograd-aware collectives. torch.distributed.nn.functional has equivalents in torch 2.13 (and they work on gloo),
# but they are deprecated there (FutureWarning on every call) in favour of the functional collectives; these few
# lines pin the exact backward we rely on.


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # Equal splits: the adjoint of the exchange is the same exchange (block s of rank r <-> block r of rank s).
        return all_to_all(grad, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # out = sum_s x_s on every rank, so d(sum_s L_s)/dx_r = sum_s dL_s/dout_s: an all-reduce of the gradients.
        return all_reduce_sum(grad, ctx.group), None


def all_to_all(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Differentiable ``all_to_all_single`` with equal splits along dim 0.

    Args:
        x: ``[P * Q, ...]``; block w (rows ``[w*Q, (w+1)*Q)``) goes to rank w.
        group: process group (``None``: the default group).

    Returns:
        ``[P * Q, ...]``; block w came from rank w. Backward is the reverse exchange.
    """
    return cast(Tensor, _AllToAll.apply(x, group))  # type: ignore[no-untyped-call]


def all_reduce_sum(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Differentiable all-reduce SUM (out of place); backward all-reduces the gradients (SUM).

    Args:
        x: any tensor, same shape on every rank.
        group: process group (``None``: the default group).

    Returns:
        ``sum over ranks of x``, same shape as ``x``.
    """
    return cast(Tensor, _AllReduceSum.apply(x, group))  # type: ignore[no-untyped-call]


def all_reduce_sum_no_grad(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """All-reduce SUM of a detached copy of ``x`` (for counts and statistics).

    Args:
        x: any tensor, same shape on every rank.
        group: process group (``None``: the default group).

    Returns:
        ``sum over ranks of x``, detached.
    """
    out = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


# --------------------------------------------------------------------------------------------------------------


def local_expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """Global ids of the experts that ``rank`` holds: ``[rank*E/P, (rank+1)*E/P)``.

    Args:
        num_experts: E, all ranks together.
        rank: r, in ``[0, P)``.
        world_size: P, ranks in the expert group.

    Returns:
        ``range`` of E/P expert ids.

    Raises:
        ValueError: E is not a positive multiple of P, or the rank is out of range.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if num_experts < 1 or num_experts % world_size != 0:
        raise ValueError(
            f"expert parallelism needs num_experts divisible by the expert-group size: num_experts={num_experts}, "
            f"world_size={world_size} (choose num_experts as a multiple of {world_size})"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


class ExpertParallelExperts(BatchedExperts):
    """This rank's E/P experts of an expert-parallel MoE layer; tokens reach them through all-to-alls.

    Dimension letters: N tokens (this rank's), M model dim, H expert hidden, E experts (all ranks), E_l = E/P local
    experts, P ranks, C capacity.

    A :class:`~supermoe_rec.modules.experts.BatchedExperts` whose parameters hold only the local experts
    (``w1 [E_l, M, H]``, ``b1 [E_l, H]``, ``w2 [E_l, H, M]``, ``b2 [E_l, M]``), under the same names, so a
    single-process state dict maps onto it by slicing dim 0 (:meth:`from_experts` does exactly that).
    ``num_experts`` is E_l; ``global_num_experts`` is E; ``expert_offset`` is the global id of local expert 0.

    Init draws the full ``[E, ...]`` weights and keeps this rank's slice, so with the same seed the P-rank layer
    holds exactly the experts of the 1-rank layer (and ranks seeded alike do not hold copies of each other's
    experts). That costs one transient full-size tensor per weight at init; a model too big for that should be
    built on ``meta`` and loaded from a sharded checkpoint.

    The forward is always the batched path (the per-expert ``REFERENCE`` loop has no buffers to exchange; the
    single-process layer is the reference). Expert gradients are scaled by ``1/P`` (see the module docstring).

    Args:
        d_model: M.
        hidden: H.
        num_experts: E, the total over all ranks; must be divisible by P.
        group: the expert process group (``None``: the default group). ``torch.distributed`` must be initialised.
        impl: must be :attr:`ExpertImpl.FAST`.
        device: where to allocate the local weights (``meta`` for deferred init).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        group: ProcessGroup | None = None,
        impl: ExpertImpl = ExpertImpl.FAST,
        device: torch.device | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelExperts needs an initialised torch.distributed process group")
        if ExpertImpl(impl) is not ExpertImpl.FAST:
            raise ValueError("expert parallelism runs the FAST (batched) expert path only")
        world_size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        experts = local_expert_range(num_experts, rank, world_size)
        # Plain attributes set before Module.__init__ because BatchedExperts.__init__ calls reset_parameters, which
        # needs the layout to draw the full-size weights.
        self.group = group
        self.world_size = world_size
        self.rank = rank
        self.global_num_experts = num_experts
        self.expert_offset = experts.start
        super().__init__(d_model, hidden, len(experts), impl=impl, device=device)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, hidden={self.hidden}, experts=[{self.expert_offset}, "
            f"{self.expert_offset + self.num_experts}) of {self.global_num_experts}, world_size={self.world_size}"
        )

    def reset_parameters(self) -> None:
        """Same distribution and RNG stream as ``BatchedExperts(num_experts=E).reset_parameters()``; keep the slice."""
        lo, hi = self.expert_offset, self.expert_offset + self.num_experts
        with torch.no_grad():
            for weight, fan_in in ((self.w1, self.d_model), (self.w2, self.hidden)):
                full = weight.new_empty((self.global_num_experts, *weight.shape[1:]))  # (E, M, H) or (E, H, M)
                nn.init.normal_(full, std=1.0 / math.sqrt(fan_in))
                weight.copy_(full[lo:hi])
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    @classmethod
    def from_experts(cls, experts: BatchedExperts, group: ProcessGroup | None = None) -> ExpertParallelExperts:
        """This rank's share of ``experts`` (all E of a single-process layer): the same weights, sliced on dim 0.

        Draws no random numbers, so a model parallelized after it was built holds exactly the experts it was built
        with, and the RNG stream continues as in a single-process run.
        """
        if isinstance(experts, ExpertParallelExperts):
            raise ValueError("these experts are already expert-parallel")
        device = experts.w1.device
        local = cls(experts.d_model, experts.hidden, experts.num_experts, group, experts.impl, torch.device("meta"))
        local = local.to_empty(device=device)
        lo, hi = local.expert_offset, local.expert_offset + local.num_experts
        with torch.no_grad():
            for name in ("w1", "b1", "w2", "b2"):
                getattr(local, name).copy_(getattr(experts, name)[lo:hi])
        return local

    def globalize(self, route: RouterOutput) -> RouterOutput:
        """One capacity agreed by the group, and losses and statistics over its global batch
        (:func:`globalize_router_output`)."""
        return globalize_router_output(route, self.group)

    def reduce_statistic(self, counts: Tensor) -> Tensor:
        """``counts`` summed over the group (detached)."""
        return all_reduce_sum_no_grad(counts, self.group)

    def compute(self, buf: Tensor) -> Tensor:
        """Run the local experts; their parameter gradients are scaled by ``1/P``.

        Args:
            buf: ``[E_l, P*C, M]`` slots received from all ranks.

        Returns:
            ``[E_l, P*C, M]`` expert outputs.
        """
        s = 1.0 / self.world_size
        w1, b1, w2, b2 = (scale_grad(p, s) for p in (self.w1, self.b1, self.w2, self.b2))
        h = F.gelu(torch.baddbmm(b1.unsqueeze(1), buf, w1))  # (E_l, P*C, H)
        return torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E_l, P*C, M)

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        """Dispatch locally, exchange, run the local experts, exchange back, combine locally.

        Args:
            x: ``[N, M]`` this rank's tokens (N may be 0).
            plan: this rank's :class:`~supermoe_rec.modules.gating.DispatchPlan` over all E experts, with the
                capacity agreed by all ranks (:func:`globalize_router_output`).

        Returns:
            ``[N, M]`` combined expert outputs (no residual); 0 for a token whose assignments were all dropped.
        """
        if plan.num_experts != self.global_num_experts:
            raise ValueError(f"plan routes over {plan.num_experts} experts, layer has {self.global_num_experts}")
        P, E_l, C, M = self.world_size, self.num_experts, plan.capacity, x.shape[1]
        buf = self.dispatch(x, plan)  # (E, C, M) = (P*E_l, C, M): block w is for rank w's experts
        recv = all_to_all(buf, self.group)  # (P*E_l, C, M): block w holds rank w's tokens for the local experts
        recv = recv.view(P, E_l, C, M).transpose(0, 1).reshape(E_l, P * C, M)  # (E_l, P*C, M)
        out = self.compute(recv)  # (E_l, P*C, M)
        out = out.view(E_l, P, C, M).transpose(0, 1).reshape(P * E_l, C, M)  # (P*E_l, C, M): block w goes home
        back = all_to_all(out, self.group)  # (E, C, M): this rank's slots, from every expert
        return self.combine(back, plan, x.shape[0])


def globalize_router_output(route: RouterOutput, group: ProcessGroup | None = None) -> RouterOutput:
    """Turn one rank's :class:`~supermoe_rec.modules.gating.RouterOutput` into global-batch losses and statistics.

    Every rank gets the same ``balance_loss``, ``z_loss``, ``tokens_per_expert`` and ``dropped_fraction``: the values
    the single-process router computes on the concatenated batch. ``balance_loss`` and ``z_loss`` stay
    differentiable w.r.t. this rank's router (through an all-reduce whose backward all-reduces the gradients).
    The plan keeps its local slots and drop decisions; its ``capacity`` becomes the maximum over ranks, so the
    dispatch buffers have one shape.

    Args:
        route: this rank's router output (``plan`` fields ``[N, K]``, ``probs`` ``[N, E]``, local losses).
        group: the expert process group (``None``: the default group).

    Returns:
        :class:`~supermoe_rec.modules.gating.RouterOutput` with the agreed capacity, local ``probs``, global scalar
        losses, ``tokens_per_expert`` ``[E]`` (sums to N_g*K) and the global ``dropped_fraction``.
    """
    plan = route.plan
    N, K = plan.expert_index.shape
    E = plan.num_experts
    counts = torch.cat(
        [route.tokens_per_expert.to(torch.int64), plan.kept.sum().reshape(1).to(torch.int64), torch.tensor([N])]
    )  # (E+2,) per-expert assignments, kept assignments, tokens
    counts = all_reduce_sum_no_grad(counts, group)  # (E+2,)
    tokens_per_expert, kept_g, N_g = counts[:E], int(counts[E]), int(counts[E + 1])
    capacity = torch.tensor([plan.capacity], dtype=torch.int64)
    dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=group)

    # The router's z_loss is sum/max(N, 1), so times max(N, 1) it is the local sum again (0 when N = 0).
    local_sums = torch.cat([route.probs.sum(dim=0), (route.z_loss * max(N, 1)).reshape(1)])  # (E+1,)
    global_sums = all_reduce_sum(local_sums, group)  # (E+1,)
    # Same formulas as TopKRouter, over the global batch (divided by max(.., 1) so N_g = 0 gives 0, not NaN).
    f = tokens_per_expert.to(route.probs.dtype) / max(N_g * K, 1)  # (E,)
    p_mean = global_sums[:E] / max(N_g, 1)  # (E,)
    balance_loss = E * torch.sum(f * p_mean)
    z_loss = global_sums[E] / max(N_g, 1)
    dropped = torch.tensor((N_g * K - kept_g) / max(N_g * K, 1), dtype=torch.float32)
    return RouterOutput(
        plan=plan._replace(capacity=int(capacity.item())),
        probs=route.probs,
        balance_loss=balance_loss,
        z_loss=z_loss,
        tokens_per_expert=tokens_per_expert,
        dropped_fraction=dropped,
        entropy=route.entropy,  # per local token: diagnostics only
    )


def expert_parallel_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the expert-parallel (not replicated) parameters in ``model``.

    Pass them to DDP as parameters to ignore, so DDP neither broadcasts them at construction (that would overwrite
    every rank's experts with rank 0's) nor averages their gradients:

    ``DistributedModelParallel(model, ..., data_parallel_wrapper=DefaultDataParallelWrapper(
    params_to_ignore=expert_parallel_parameter_names(model)))`` (DMP overwrites any ignore list set on the model
    beforehand, so it must go through the wrapper).

    Args:
        model: the unwrapped module (names are relative to it, as DDP/DMP see them).

    Returns:
        names such as ``"encoder.blocks.1.ffn.experts.w1"``, in ``named_modules`` order.
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for param_name, _ in module.named_parameters(recurse=False):
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def parallelize_experts(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Split the experts of every :class:`~supermoe_rec.modules.moe.MoELayer` in ``model`` over ``group``'s ranks.

    Each layer's ``experts`` (all E) is replaced, in place, by :meth:`ExpertParallelExperts.from_experts`: this
    rank's E/P of the same weights. Call it on the built model before DMP/DDP wraps it; models without MoE layers
    are returned unchanged.

    Args:
        model: a built model (every rank built it alike, e.g. from the same seed).
        group: the expert process group (``None``: the default group); it must be the data-parallel group.

    Returns:
        ``model``.
    """
    for module in model.modules():
        if isinstance(module, MoELayer) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts.from_experts(module.experts, group)
    return model
