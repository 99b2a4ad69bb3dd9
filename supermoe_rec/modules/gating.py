"""Top-k softmax router and the dispatch plan it produces (GShard/Switch style).

Dimension letters: N tokens (already-flattened real tokens, N = number of non-padding B*L positions), M model dim,
E experts, K top-k, C capacity (slots per expert).

Routing is split in two, so that expert parallelism (:mod:`supermoe_rec.distributed.expert_parallel`) swaps the
data movement without touching the maths:

1. :class:`TopKRouter` scores tokens and picks K experts per token (``expert_index`` [N, K], ``gates`` [N, K]),
   and computes the auxiliary losses.
2. :func:`make_dispatch_plan` turns the choices into slots: for every assignment, its position inside its expert's
   buffer and whether it fits under the capacity. The result, :class:`DispatchPlan`, is everything the expert
   side needs; it does not look at the router again.

Capacity priority (when an expert receives more than C assignments): all top-1 choices rank before all top-2
choices, and within the same choice rank earlier tokens win (GShard). So a token loses its second expert before any
other token loses its first.

The recipe options (``model.moe``):

- ``score_func``: ``softmax`` (probabilities over E) or ``sigmoid`` (an independent score per expert in (0, 1)); with
  sigmoid the top-k weights are normalised to sum to 1 (for K = 1 the raw score is kept, so the task loss still
  reaches the router).
- ``load_balance``: ``aux_loss`` (the load-balancing loss below), ``bias`` (auxiliary-loss-free balancing: a
  per-expert bias, the ``expert_bias`` buffer, is added to the scores for the top-k *selection* only; the gate
  weights use the unbiased scores; after each optimizer step :func:`update_router_biases` moves it by
  ``bias_update_rate`` towards balance, from the load observed since the last update, all-reduced over every rank)
  or ``none``. Under ``bias`` and ``none`` the returned ``balance_loss`` is a constant 0 (it is still a diagnostic
  in :mod:`supermoe_rec.modules.moe_stats`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from supermoe_rec.config.experiment import LoadBalance, MoEConfig, ScoreFunc


class DispatchPlan(NamedTuple):
    """Where each of the N*K token->expert assignments goes. Row n, column k is token n's k-th choice.

    Attributes:
        expert_index: ``[N, K]`` int64, chosen expert per assignment.
        position: ``[N, K]`` int64, slot inside that expert's buffer (rank by priority). Meaningful only where
            ``kept``; dropped assignments have ``position >= capacity``.
        kept: ``[N, K]`` bool, the assignment fits under the capacity.
        gates: ``[N, K]`` float32, combine weights (differentiable w.r.t. the router). Dropped assignments keep
            their gate value here; the expert side must ignore them via ``kept``.
        capacity: C, slots per expert in the dispatch buffer ``[E, C, M]``.
        num_experts: E.
        dropless: the router ran without a capacity (every assignment is kept, C is the largest per-expert count),
            so the experts may take the sorted grouped path instead of the padded ``[E, C, M]`` buffer.
    """

    expert_index: Tensor
    position: Tensor
    kept: Tensor
    gates: Tensor
    capacity: int
    num_experts: int
    dropless: bool = False


class RouterOutput(NamedTuple):
    """What :class:`TopKRouter` returns.

    Attributes:
        plan: the :class:`DispatchPlan`.
        probs: ``[N, E]`` float32 router probabilities (after noise, if any); under ``score_func=sigmoid`` the
            scores normalised over E, so that they sum to 1 per token like softmax probabilities.
        balance_loss: scalar, ``E * sum_e f_e * P_e`` (1.0 under perfectly uniform routing); a constant 0 unless
            ``load_balance=aux_loss``.
        z_loss: scalar, ``mean_n logsumexp(logits_n)^2``.
        tokens_per_expert: ``[E]`` int64, assignments per expert before dropping (sums to N*K), detached.
        dropped_fraction: scalar float32, fraction of the N*K assignments dropped by capacity, detached.
        entropy: ``[N]`` float32 routing entropy ``-sum_e p_e log p_e`` of each token's ``probs`` (nats), detached;
            ``None`` unless the router's ``collect_stats`` is set.
    """

    plan: DispatchPlan
    probs: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    entropy: Tensor | None = None


def compute_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ``C = ceil(capacity_factor * N * K / E)``, capped at N.

    The cap is free: an expert can receive at most one assignment per token (top-k picks distinct experts), so
    slots beyond N would always be empty. It keeps the buffer small when E is tiny (E=1 would otherwise allocate
    ``capacity_factor * N`` rows).

    Example::

        >>> compute_capacity(num_tokens=100, num_experts=8, top_k=2, capacity_factor=1.25)
        32
        >>> compute_capacity(num_tokens=10, num_experts=1, top_k=1, capacity_factor=2.0)
        10
    """
    return min(math.ceil(capacity_factor * num_tokens * top_k / num_experts), num_tokens)


def make_dispatch_plan(
    expert_index: Tensor, gates: Tensor, num_experts: int, capacity: int | None
) -> tuple[DispatchPlan, Tensor]:
    """Assign every (token, choice) a slot in its expert's buffer, top-1 choices first, then by token order.

    A stable sort by expert of the choice-major flattened assignments gives each expert its assignments in
    priority order; the rank within the expert is the slot. This costs O(N*K log(N*K)), independent of E (no
    [N*K, E] one-hot cumsum).

    Args:
        expert_index: ``[N, K]`` int64 chosen experts.
        gates: ``[N, K]`` combine weights, passed through into the plan.
        num_experts: E.
        capacity: C, or ``None`` for dropless (C = the largest per-expert count, so nothing is dropped).

    Returns:
        ``(plan, tokens_per_expert)`` where ``tokens_per_expert`` is ``[E]`` int64 counts before dropping.

    Example::

        >>> idx = torch.tensor([[1, 0], [0, 1], [0, 2]])  # (N=3, K=2)
        >>> plan, counts = make_dispatch_plan(idx, torch.full((3, 2), 0.5), num_experts=3, capacity=2)
        >>> counts.tolist()
        [3, 2, 1]
        >>> plan.position.tolist()  # expert 0: tokens 1 and 2 (top-1) rank before token 0 (top-2)
        [[0, 2], [0, 1], [1, 0]]
        >>> plan.kept.tolist()
        [[True, False], [True, True], [True, True]]
    """
    N, K = expert_index.shape
    # Choice-major order: all top-1 choices (k=0) for tokens 0..N-1, then all top-2 choices, ...
    flat_expert = expert_index.t().reshape(K * N)  # (K*N,)
    tokens_per_expert = torch.bincount(flat_expert, minlength=num_experts)  # (E,)
    # Stable, so within one expert the choice-major order (= priority) is preserved.
    order = torch.argsort(flat_expert, stable=True)  # (K*N,)
    starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert  # (E,) first sorted index of each expert
    rank_sorted = torch.arange(K * N, device=expert_index.device) - starts[flat_expert[order]]  # (K*N,)
    flat_position = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (K*N,)
    position = flat_position.view(K, N).t()  # (N, K)
    dropless = capacity is None
    if capacity is None:
        # Dropless needs a host sync to size the buffer; acceptable for the CPU and single-device paths.
        capacity = int(tokens_per_expert.max().item()) if N > 0 else 0
    kept = position < capacity  # (N, K)
    plan = DispatchPlan(
        expert_index=expert_index,
        position=position,
        kept=kept,
        gates=gates,
        capacity=capacity,
        num_experts=num_experts,
        dropless=dropless,
    )
    return plan, tokens_per_expert


class TopKRouter(nn.Module):
    """Top-k router with capacity, Switch (K=1) / GShard (K=2) style, with the recipe's scoring and balancing options.

    Dimension letters: N tokens, M model dim, E experts, K top-k, C capacity.

    - Logits ``x @ weight^T`` (no bias), softmax over E in float32 (bf16 softmax makes the top-k unstable).
    - Combine weights: for K >= 2 the top-k probabilities renormalised to sum to 1 over the chosen experts. For
      K = 1 the raw top-1 probability (Switch): renormalising would make the gate the constant 1.0, and the router
      would then get no gradient from the task loss, only from the auxiliary losses.
    - Training-only perturbations: ``router_jitter`` multiplies the router *input* by U(1-eps, 1+eps) noise
      (Switch), ``router_noise`` adds N(0, sigma^2) to the logits. Neither is applied in eval.
    - Capacity ``C = ceil(cf * N * K / E)`` with ``cf = capacity_factor_train`` in training and
      ``capacity_factor_eval`` in eval; ``dropless=True`` never drops. See :func:`make_dispatch_plan` for the
      priority rule.
    - Load-balancing loss ``E * sum_e f_e * P_e`` where ``f_e`` is the fraction of *all* N*K assignments (before
      dropping) that choose expert e, and ``P_e`` is the mean router probability of e. Counting every choice, not
      only top-1, balances second-choice load too, which consumes capacity just like first-choice load. It is 1.0
      under perfectly uniform routing and grows up to E under collapse.
    - Router z-loss ``mean_n logsumexp(logits_n)^2`` keeps the logits small (ST-MoE).
    - ``score_func=sigmoid``: scores ``sigmoid(logits)``; gates are the top-k scores normalised to sum to 1 (K >= 2;
      K = 1 keeps the raw score); ``probs`` (and so ``P_e``) are the scores normalised over E.
    - ``load_balance=bias``: selection is ``topk(scores + expert_bias)``, the gates use the unbiased scores; the
      training load is accumulated for :func:`update_router_biases`. ``bias`` and ``none`` return a zero
      ``balance_loss``.
    - With ``num_kinds > 0`` (``config.task_routers``) every token also has a kind (for SUPERMOE: ``[USER]``, each
      task token, history) and its logits are ``x @ (weight + kind_weight)^T``: a per-kind router on top of the shared
      one. ``kind_weight`` starts at zero, so training starts from shared routing and learns where kinds should part.

    Args:
        d_model: M, input width.
        config: :class:`~supermoe_rec.config.experiment.MoEConfig` (``num_experts``, ``top_k``, capacity factors,
            ``dropless``, ``router_jitter``, ``router_noise`` are read here).
        device: where to allocate the gate weight (``meta`` for deferred init).
        num_kinds: R, token kinds with their own router residual ``kind_weight`` ``[R, E, M]`` (0: one shared
            router for every token).

    Example::

        >>> from supermoe_rec.config.experiment import MoEConfig
        >>> _ = torch.manual_seed(0)
        >>> router = TopKRouter(16, MoEConfig(num_experts=4, top_k=2))
        >>> out = router(torch.randn(10, 16))
        >>> out.plan.expert_index.shape, out.plan.capacity, int(out.tokens_per_expert.sum())
        (torch.Size([10, 2]), 7, 20)
    """

    def __init__(self, d_model: int, config: MoEConfig, device: torch.device | None = None, num_kinds: int = 0) -> None:
        super().__init__()
        if config.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {config.num_experts}")
        if not 1 <= config.top_k <= config.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={config.num_experts}], got {config.top_k}")
        if config.capacity_factor_train <= 0 or config.capacity_factor_eval <= 0:
            raise ValueError("capacity factors must be > 0")
        self.d_model = d_model
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.dropless = config.dropless
        self.router_jitter = config.router_jitter
        self.router_noise = config.router_noise
        self.score_func = ScoreFunc(config.score_func).value  # ValueError for an unknown name
        self.load_balance = LoadBalance(config.load_balance).value
        if config.bias_update_rate <= 0:
            raise ValueError(f"bias_update_rate must be > 0, got {config.bias_update_rate}")
        self.bias_update_rate = float(config.bias_update_rate)
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model, device=device))  # (E, M)
        self.expert_bias: Tensor | None
        if self.load_balance == "bias":
            # State (saved in checkpoints), never trained by gradients: update_router_biases moves it.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, device=device))  # (E,)
        else:
            self.expert_bias = None
        # Training load since the last bias update (a plain attribute, not a buffer: DDP must not broadcast it).
        self.pending_load: Tensor | None = None
        # Set by supermoe_rec.modules.moe_stats.collect_stats: also return the per-token routing entropy.
        self.collect_stats = False
        self.num_kinds = num_kinds
        self.kind_weight = (
            nn.Parameter(torch.empty(num_kinds, config.num_experts, d_model, device=device)) if num_kinds else None
        )  # (R, E, M)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small init, normal with std sqrt(0.1 / M): near-uniform routing at the start, so experts begin
        balanced and the balance loss starts near 1."""
        nn.init.normal_(self.weight, std=math.sqrt(0.1 / self.d_model))
        if self.kind_weight is not None:
            nn.init.zeros_(self.kind_weight)
        if self.expert_bias is not None:
            nn.init.zeros_(self.expert_bias)
        self.pending_load = None

    def capacity(self, num_tokens: int) -> int | None:
        """C for ``num_tokens`` tokens in the current mode; ``None`` in dropless mode."""
        if self.dropless:
            return None
        cf = self.capacity_factor_train if self.training else self.capacity_factor_eval
        return compute_capacity(num_tokens, self.num_experts, self.top_k, cf)

    def forward(self, x: Tensor, kinds: Tensor | None = None) -> RouterOutput:
        """Route tokens.

        Args:
            x: ``[N, M]`` tokens.
            kinds: ``[N]`` int64 kind per token in ``[0, R)``; required when the router has ``num_kinds > 0``,
                ignored otherwise.

        Returns:
            :class:`RouterOutput`: ``plan`` (``[N, K]`` fields, capacity C), ``probs`` ``[N, E]``, scalar
            ``balance_loss`` and ``z_loss``, ``tokens_per_expert`` ``[E]``, scalar ``dropped_fraction``.
        """
        N = x.shape[0]
        E, K = self.num_experts, self.top_k
        h = x.float()  # (N, M)
        if self.training and self.router_jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        logits = F.linear(h, self.weight.float())  # (N, E)
        if self.kind_weight is not None:
            if kinds is None or kinds.shape != (N,):
                raise ValueError(f"a router with {self.num_kinds} token kinds needs kinds of shape [N]={[N]}")
            R = self.num_kinds
            per_kind = F.linear(h, self.kind_weight.float().reshape(R * E, -1)).view(N, R, E)  # (N, R, E)
            logits = logits + per_kind.gather(1, kinds.long().view(N, 1, 1).expand(N, 1, E)).squeeze(1)  # (N, E)
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1)
        if self.score_func == "softmax":
            scores = torch.exp(logits - lse)  # (N, E) softmax, reusing the z-loss's logsumexp
            probs = scores
        else:
            scores = torch.sigmoid(logits)  # (N, E)
            probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # (N, E)
        with torch.no_grad():
            select = scores if self.expert_bias is None else scores + self.expert_bias  # (N, E)
            expert_index = torch.topk(select, K, dim=-1).indices  # (N, K)
        top = scores.gather(1, expert_index)  # (N, K) unbiased scores of the chosen experts
        gates = top if K == 1 else top / top.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # (N, K)

        plan, tokens_per_expert = make_dispatch_plan(expert_index, gates, E, self.capacity(N))
        if self.expert_bias is not None and self.training:
            load = tokens_per_expert.detach().to(torch.float32)
            self.pending_load = load if self.pending_load is None else self.pending_load + load

        # Sums divided by max(.., 1) rather than means: N = 0 gives 0 instead of NaN and keeps the graph
        # connected to the router weight (so DDP sees the parameter used).
        if self.load_balance == "aux_loss":
            f = tokens_per_expert.to(probs.dtype) / max(N * K, 1)  # (E,)
            p_mean = probs.sum(dim=0) / max(N, 1)  # (E,)
            balance_loss = E * torch.sum(f * p_mean)
        else:
            balance_loss = torch.zeros((), device=x.device)
        z_loss = lse.pow(2).sum() / max(N, 1)
        dropped = (N * K - plan.kept.sum()).to(torch.float32) / max(N * K, 1)
        entropy = None
        if self.collect_stats:
            with torch.no_grad():
                entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1)  # (N,)
        return RouterOutput(
            plan=plan,
            probs=probs,
            balance_loss=balance_loss,
            z_loss=z_loss,
            tokens_per_expert=tokens_per_expert.detach(),
            dropped_fraction=dropped.detach(),
            entropy=entropy,
        )

    def update_bias(self, load: Tensor) -> None:
        """One auxiliary-loss-free balancing step: ``expert_bias += rate * sign(mean(load) - load)``.

        Underloaded experts (load below the mean) move up by ``bias_update_rate``, overloaded ones down, experts at
        the mean stay. Every rank must pass the same (global) ``load`` so the replicas stay identical.

        Args:
            load: ``[E]`` assignments per expert since the last update (any scale: only signs are used).
        """
        if self.expert_bias is None:
            raise RuntimeError("update_bias needs load_balance=bias")
        with torch.no_grad():
            load = load.to(self.expert_bias.device, torch.float32)
            self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)
        self.pending_load = None


def bias_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of ``model`` that balance with ``load_balance=bias``, in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None]


def update_router_biases(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """After an optimizer step: move every bias router's ``expert_bias`` from the load it saw since the last call.

    The loads of all routers are concatenated and all-reduced (SUM) over ``group`` in one collective when
    ``torch.distributed`` is initialised, so every data-parallel and expert-parallel rank applies the same global
    update and the replicated biases stay identical. Every rank of the group must call it the same number of times.
    A router that saw no training tokens since the last call counts as load 0 on this rank.

    Args:
        model: any module (a DMP/DDP wrapper too: ``modules()`` reaches the routers).
        group: the process group spanning every rank that trains the model (``None``: the default group).

    Returns:
        the number of routers updated (0 when the model has no bias router).
    """
    routers = bias_routers(model)
    if not routers:
        return 0
    loads = [
        r.pending_load if r.pending_load is not None else torch.zeros(r.num_experts, device=r.weight.device)
        for r in routers
    ]
    flat = torch.cat([load.to(torch.float32) for load in loads])  # (sum_r E_r,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for router, load in zip(routers, torch.split(flat, [r.num_experts for r in routers]), strict=True):
        router.update_bias(load)
    return len(routers)
