"""Sparse Mixture-of-Experts FFN layer: :class:`TopKRouter` + :class:`BatchedExperts`.

Dimension letters: B batch, L length, N tokens (real, non-padding B*L positions, flattened by the caller),
M model dim, H expert hidden, E experts, K top-k, C capacity, T tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.modules.experts import BatchedExperts, DenseFFN, ExpertImpl
from supermoe_rec.modules.gating import TopKRouter
from supermoe_rec.modules.moe_stats import MoEStatsAccumulator


class MoEOutput(NamedTuple):
    """What :class:`MoELayer` returns.

    Attributes:
        hidden: ``[N, M]`` FFN output only; the caller adds the residual. A token whose assignments were all
            dropped gets exactly 0, so it passes through the residual unchanged.
        balance_loss: scalar load-balancing loss ``E * sum_e f_e * P_e`` (unweighted; 1.0 when uniform); a constant
            0 unless ``config.load_balance`` is ``aux_loss``.
        z_loss: scalar router z-loss ``mean logsumexp(logits)^2`` (unweighted).
        tokens_per_expert: ``[E]`` int64 assignments per expert before dropping (sums to N*K), detached.
        dropped_fraction: scalar, fraction of the N*K assignments dropped by capacity, detached.
        task_expert_counts: ``[T, E]`` int64 assignments per (task id, expert) before dropping, detached; ``None``
            when no ``task_ids`` were given or the layer has ``num_tasks == 0``.
    """

    hidden: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    task_expert_counts: Tensor | None


class MoELayer(nn.Module):
    """Sparse MoE FFN: top-k softmax routing with capacity, E batched GELU experts, auxiliary losses.

    Dimension letters: N tokens, M model dim, H expert hidden, E experts, K top-k, C capacity, T tasks.

    Per token the layer runs K experts of width H, so compute per token depends on K and not on E; parameters grow
    with E. Routing (:class:`~supermoe_rec.modules.gating.TopKRouter`, producing a dispatch plan) is kept apart from
    expert compute (:class:`~supermoe_rec.modules.experts.BatchedExperts`) so that expert parallelism can replace
    the dispatch/combine with all-to-alls. The losses are returned unweighted; ``train.loss.balance_loss_weight`` and
    ``train.loss.z_loss_weight`` are applied by the loss module.

    The recipe (``config``): ``num_shared_experts`` E_s adds E_s always-active experts of width H (``shared``, one
    :class:`~supermoe_rec.modules.experts.DenseFFN` of width E_s*H) to the routed output; ``score_func`` and
    ``load_balance`` are the router's (:mod:`~supermoe_rec.modules.gating`; under ``bias`` the trainer calls
    :func:`~supermoe_rec.modules.gating.update_router_biases` after every step); ``dropless`` runs the dropless
    fast path. Diagnostics accumulate in ``stats`` while ``collect_stats`` is set
    (:mod:`supermoe_rec.modules.moe_stats`).

    The layer always holds all E experts. Expert parallelism is applied from outside, to a built model:
    :func:`supermoe_rec.distributed.expert_parallel.parallelize_experts` swaps ``experts`` for this rank's share,
    whose :meth:`~supermoe_rec.modules.experts.BatchedExperts.globalize` makes the losses and statistics global.

    Args:
        d_model: M.
        config: :class:`~supermoe_rec.config.experiment.MoEConfig` (E, K, H, capacity factors, dropless, router noise).
        num_tasks: T, for the ``task_expert_counts`` routing statistic (0: not tracked) and, with
            ``config.task_routers``, the number of per-task router residuals.
        device: where to allocate parameters (``meta`` for deferred init; then ``to_empty`` +
            ``reset_parameters``).
        impl: :class:`~supermoe_rec.modules.experts.ExpertImpl`, fast batched path or the reference loop.

    Example::

        >>> from supermoe_rec.config.experiment import MoEConfig
        >>> _ = torch.manual_seed(0)
        >>> layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=32), num_tasks=3)
        >>> x = torch.randn(2 * 5, 16)  # (B*L, M) real tokens
        >>> out = layer(x, task_ids=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]))
        >>> out.hidden.shape, out.tokens_per_expert.shape, out.task_expert_counts.shape
        (torch.Size([10, 16]), torch.Size([4]), torch.Size([3, 4]))
        >>> int(out.tokens_per_expert.sum()), int(out.task_expert_counts.sum())
        (20, 20)
    """

    def __init__(
        self,
        d_model: int,
        config: MoEConfig,
        num_tasks: int = 0,
        device: torch.device | None = None,
        impl: ExpertImpl = ExpertImpl.FAST,
    ) -> None:
        super().__init__()
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
        self.d_model = d_model
        self.config = config
        self.num_tasks = num_tasks
        if config.task_routers and num_tasks == 0:
            raise ValueError("moe.task_routers needs the token kinds: num_tasks > 0")
        if config.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {config.num_shared_experts}")
        self.router = TopKRouter(d_model, config, device=device, num_kinds=num_tasks if config.task_routers else 0)
        self.experts = BatchedExperts(d_model, config.expert_hidden, config.num_experts, impl=impl, device=device)
        # E_s shared experts of width H, always active: one dense FFN of width E_s * H is exactly their sum.
        E_s = config.num_shared_experts
        self.shared = DenseFFN(d_model, E_s * config.expert_hidden, device=device) if E_s > 0 else None
        # Diagnostics (supermoe_rec.modules.moe_stats.set_collect_stats): off unless asked for.
        self.collect_stats = False
        self.stats = MoEStatsAccumulator(config.num_experts, num_tasks)

    def reset_parameters(self) -> None:
        """Re-initialise router, experts and shared experts (e.g. after ``to_empty`` on a meta-built layer)."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared is not None:
            self.shared.reset_parameters()

    def _task_expert_counts(self, task_ids: Tensor | None, expert_index: Tensor) -> Tensor | None:
        if task_ids is None or self.num_tasks == 0:
            return None
        E, T = self.config.num_experts, self.num_tasks
        if task_ids.shape != expert_index.shape[:1]:
            raise ValueError(f"task_ids must have shape [N]={list(expert_index.shape[:1])}, got {list(task_ids.shape)}")
        if task_ids.numel() > 0 and (int(task_ids.min()) < 0 or int(task_ids.max()) >= T):
            raise ValueError(f"task_ids must lie in [0, {T}), got range [{int(task_ids.min())}, {int(task_ids.max())}]")
        pair = task_ids.long().unsqueeze(1) * E + expert_index  # (N, K) flat (task, expert) id
        return torch.bincount(pair.reshape(-1), minlength=T * E).view(T, E)  # (T, E)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> MoEOutput:
        """Route and run the experts.

        Args:
            x: ``[N, M]`` real tokens (N may be 0).
            task_ids: optional ``[N]`` int64 task id in ``[0, T)`` per token, for ``task_expert_counts`` and, with
                ``config.task_routers``, for routing (then required).

        Returns:
            :class:`MoEOutput` with ``hidden`` ``[N, M]``, scalar ``balance_loss``, ``z_loss`` and
            ``dropped_fraction``, ``tokens_per_expert`` ``[E]`` and ``task_expert_counts`` ``[T, E]`` or ``None``.
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must be [N, M={self.d_model}], got {list(x.shape)}")
        # Expert-parallel experts agree one capacity and make the losses and statistics global here.
        route = self.experts.globalize(self.router(x, task_ids))
        if self.router.load_balance != "aux_loss":  # expert-parallel globalize recomputes it: keep it a constant 0
            route = route._replace(balance_loss=torch.zeros((), device=x.device))
        hidden = self.experts(x, route.plan)  # (N, M)
        if self.shared is not None:
            hidden = hidden + self.shared(x)  # (N, M) every token, dropped or not
        task_expert_counts = self._task_expert_counts(task_ids, route.plan.expert_index.detach())
        if task_expert_counts is not None:
            task_expert_counts = self.experts.reduce_statistic(task_expert_counts)
        if self.collect_stats:
            self.stats.add(route.tokens_per_expert, route.entropy, task_ids, self.experts.last_activity)
            self.experts.last_activity = None
        return MoEOutput(
            hidden=hidden,
            balance_loss=route.balance_loss,
            z_loss=route.z_loss,
            tokens_per_expert=route.tokens_per_expert,
            dropped_fraction=route.dropped_fraction,
            task_expert_counts=task_expert_counts,
        )
