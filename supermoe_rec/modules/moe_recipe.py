"""Fine-grained experts at a fixed active size: pick (E, K, H) for a target of active parameters per MoE layer.

Dimension letters: M model dim, E routed experts, K top-k, H expert hidden width, E_s shared experts.

Parameter counts of one :class:`~supermoe_rec.modules.moe.MoELayer` (GELU FFN experts ``M -> H -> M`` with biases;
the router ``[E, M]``; ``E_s`` shared experts of the same width H, always active):

- per expert: ``2*M*H + H + M``;
- active per token: ``E*M`` (the router scores every expert) ``+ (K + E_s) * (2*M*H + H + M)``;
- total: ``E*M + (E + E_s) * (2*M*H + H + M)`` (per-kind router residuals, ``moe.task_routers``, add ``R*E*M`` more
  to both; they are the same for every shape at fixed E, so they are left out here).

Fine-grained experts (DeepSeekMoE) split every expert into smaller ones and route to more of them: at fixed active
parameters K grows and H shrinks as ``1/(K + E_s)``. :func:`choose_expert_shape` solves H for the target, the shared
experts taking their share of the active budget (they count as active experts of the same width). Unless K is
given it uses ``K = max(1, round(sqrt(E) / 2))`` (E=4: 1, E=16: 2, E=64: 4): experts get finer as E grows, and the
total parameters still grow, as ``E / K ~ 2 sqrt(E)`` expert-widths, so a scaling study has a parameter axis. (Keeping
``K / E`` fixed instead would keep the total constant.)

Example::

    >>> target = active_params(64, 8, 2, 128)  # today's default MoE layer: E=8, K=2, H=128
    >>> [(s.num_experts, s.top_k, s.expert_hidden) for s in (choose_expert_shape(64, target, e) for e in (4, 16, 64))]
    [(4, 1, 258), (16, 2, 126), (64, 4, 57)]
    >>> choose_expert_shape(64, target, num_experts=16, num_shared=1).expert_hidden
    84
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ExpertShape", "active_params", "choose_expert_shape", "dense_hidden_for", "total_params"]


def _per_expert(d_model: int, hidden: int) -> int:
    return 2 * d_model * hidden + hidden + d_model


def active_params(d_model: int, num_experts: int, top_k: int, hidden: int, num_shared: int = 0) -> int:
    """Parameters one token uses in one MoE layer: the router plus K routed and E_s shared experts."""
    return num_experts * d_model + (top_k + num_shared) * _per_expert(d_model, hidden)


def total_params(d_model: int, num_experts: int, hidden: int, num_shared: int = 0) -> int:
    """Parameters of one MoE layer: the router plus E routed and E_s shared experts."""
    return num_experts * d_model + (num_experts + num_shared) * _per_expert(d_model, hidden)


def dense_hidden_for(d_model: int, target_active: int) -> int:
    """Hidden width of a dense GELU FFN (``2*M*H + H + M`` parameters) with about ``target_active`` parameters."""
    return max(1, round((target_active - d_model) / (2 * d_model + 1)))


@dataclass(frozen=True)
class ExpertShape:
    """A chosen MoE shape and its parameter counts per MoE layer."""

    num_experts: int
    top_k: int
    expert_hidden: int
    num_shared_experts: int
    active: int
    total: int
    target_active: int

    def overrides(self, prefix: str = "--model.moe.") -> list[str]:
        """Config overrides that build this shape."""
        return [
            f"{prefix}num_experts={self.num_experts}",
            f"{prefix}top_k={self.top_k}",
            f"{prefix}expert_hidden={self.expert_hidden}",
            f"{prefix}num_shared_experts={self.num_shared_experts}",
        ]

    def describe(self) -> str:
        """One line: the shape and how close its active count is to the target."""
        gap = 100.0 * (self.active - self.target_active) / self.target_active
        return (
            f"E={self.num_experts} K={self.top_k} H={self.expert_hidden} shared={self.num_shared_experts}: "
            f"{self.active:,} active parameters per MoE layer (target {self.target_active:,}, {gap:+.1f}%), "
            f"{self.total:,} in total"
        )


def choose_expert_shape(
    d_model: int,
    target_active: int,
    num_experts: int,
    top_k: int | None = None,
    num_shared: int = 0,
) -> ExpertShape:
    """Pick K and H for E experts so that a token's active parameters per MoE layer are close to ``target_active``.

    Args:
        d_model: M.
        target_active: active parameters per token per MoE layer (e.g. :func:`active_params` of today's shape).
        num_experts: E, routed experts.
        top_k: K; default ``max(1, round(sqrt(E) / 2))`` (fine-grained: K grows with E), capped at E.
        num_shared: E_s shared experts (always active, same width H).

    Returns:
        the :class:`ExpertShape` (H >= 1, rounded to the nearest width).

    Raises:
        ValueError: E < 1, or the router alone (E*M) already exceeds the target.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    k = top_k if top_k is not None else max(1, round(math.sqrt(num_experts) / 2))
    k = min(k, num_experts)
    budget = target_active - num_experts * d_model - (k + num_shared) * d_model
    if budget <= 0:
        raise ValueError(
            f"a router over {num_experts} experts at d_model={d_model} already uses {num_experts * d_model:,} of the "
            f"{target_active:,} active parameters"
        )
    hidden = max(1, round(budget / ((k + num_shared) * (2 * d_model + 1))))
    # Nearest of hidden and hidden +- 1 by active count (rounding the quotient can miss by one).
    hidden = min(
        (h for h in (hidden - 1, hidden, hidden + 1) if h >= 1),
        key=lambda h: (abs(active_params(d_model, num_experts, k, h, num_shared) - target_active), h),
    )
    return ExpertShape(
        num_experts=num_experts,
        top_k=k,
        expert_hidden=hidden,
        num_shared_experts=num_shared,
        active=active_params(d_model, num_experts, k, hidden, num_shared),
        total=total_params(d_model, num_experts, hidden, num_shared),
        target_active=target_active,
    )


def _main() -> None:  # pragma: no cover - a command-line convenience
    import argparse

    parser = argparse.ArgumentParser(description="print the (E, K, H) choice for a target of active parameters")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--target", type=int, default=None, help="active params per MoE layer (default: E=8 K=2 H=128)")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--shared", type=int, default=0)
    args = parser.parse_args()
    target = args.target or active_params(args.d_model, 8, 2, 128)
    for e in args.experts:
        print(choose_expert_shape(args.d_model, target, e, num_shared=args.shared).describe())
    print(f"dense FFN: hidden {dense_hidden_for(args.d_model, target)} for {target:,} parameters")


if __name__ == "__main__":  # pragma: no cover
    _main()
