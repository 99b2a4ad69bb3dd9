"""Expert FFNs stored as batched weights, plus the dense FFN twin used by ablations.

Dimension letters: N tokens, D model dim, H expert hidden width, E experts, K top-k, C capacity (slots per expert).

:class:`BatchedExperts` runs the E two-layer GELU FFNs ``y = gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` on the
tokens a :class:`~supermoe_rec.modules.gating.DispatchPlan` sends them, and combines the outputs weighted by the
gates. Two implementations, selected by :class:`ExpertImpl`, must agree (outputs and gradients):

- ``FAST``: scatter kept assignments into an ``[E, C, D]`` buffer, two ``torch.bmm`` calls, gather back. Work is
  ``E * C ~= capacity_factor * N * K`` rows, so compute per token depends on K, not on E.
  ``torch._grouped_mm`` would avoid the padding, but in torch 2.13 on CPU its backward fails and fp32 inputs need
  16-byte aligned strides, so bmm it is.
- ``REFERENCE``: a plain Python loop over experts with ``index_select`` / ``index_add``; it ignores buffer
  positions entirely, so it also checks the slot bookkeeping of the fast path.

The fast path is split into :meth:`BatchedExperts.dispatch`, :meth:`BatchedExperts.compute` and
:meth:`BatchedExperts.combine` so that expert parallelism can insert an all-to-all around ``compute``.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from supermoe_rec.modules.gating import DispatchPlan


class ExpertImpl(str, enum.Enum):
    """Which expert implementation :class:`BatchedExperts` runs."""

    FAST = "fast"
    REFERENCE = "reference"


def _init_ffn_weight(weight: Tensor, fan_in: int) -> None:
    # LeCun-normal (std = 1/sqrt(fan_in)): keeps activation variance roughly constant through each matmul at the
    # small widths this project uses (D=64); a fixed std of 0.02 would shrink the FFN output ~10x at D=64.
    nn.init.normal_(weight, std=1.0 / math.sqrt(fan_in))


class BatchedExperts(nn.Module):
    """E GELU FFN experts with batched weights ``w1 [E, D, H]``, ``b1 [E, H]``, ``w2 [E, H, D]``, ``b2 [E, D]``.

    Dimension letters: N tokens, D model dim, H expert hidden, E experts, K top-k, C capacity.

    Init: weights normal with std ``1/sqrt(fan_in)`` (fan_in D for w1, H for w2), biases zero. The same init as
    :class:`DenseFFN`, so dense-vs-MoE ablations start alike.

    Args:
        d_model: D.
        hidden: H, hidden width of each expert.
        num_experts: E.
        impl: :class:`ExpertImpl` (``FAST`` batched bmm, or ``REFERENCE`` per-expert loop). Also settable later
            through the ``impl`` attribute.
        device: where to allocate weights (``meta`` for deferred init; then ``to_empty`` + ``reset_parameters``).

    Example::

        >>> from supermoe_rec.modules.gating import make_dispatch_plan
        >>> _ = torch.manual_seed(0)
        >>> experts = BatchedExperts(d_model=8, hidden=16, num_experts=4)
        >>> x = torch.randn(5, 8)
        >>> idx = torch.tensor([[0], [1], [1], [3], [1]])
        >>> plan, _ = make_dispatch_plan(idx, torch.ones(5, 1), num_experts=4, capacity=2)
        >>> y = experts(x, plan)
        >>> y.shape, bool(y[4].eq(0).all())  # token 4 is expert 1's third assignment: dropped, output 0
        (torch.Size([5, 8]), True)
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        impl: ExpertImpl = ExpertImpl.FAST,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.hidden = hidden
        self.num_experts = num_experts
        self.impl = ExpertImpl(impl)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden, device=device))  # (E, D, H)
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden, device=device))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model, device=device))  # (E, H, D)
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, device=device))  # (E, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights normal with std 1/sqrt(fan_in), biases zero."""
        _init_ffn_weight(self.w1, self.d_model)
        _init_ffn_weight(self.w2, self.hidden)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    @staticmethod
    def _kept_assignments(plan: DispatchPlan) -> tuple[Tensor, Tensor, Tensor]:
        """Token index, buffer row (``e * C + position``) and gate of every kept assignment, each ``[M]``."""
        K = plan.expert_index.shape[1]
        kept = plan.kept.reshape(-1).nonzero().squeeze(1)  # (M,) flat n*K + k of kept assignments
        token = torch.div(kept, K, rounding_mode="floor")  # (M,)
        row = (plan.expert_index.reshape(-1) * plan.capacity + plan.position.reshape(-1)).index_select(0, kept)
        gate = plan.gates.reshape(-1).index_select(0, kept)  # (M,)
        return token, row, gate

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        """Scatter kept assignments into the expert buffer.

        Args:
            x: ``[N, D]`` tokens.
            plan: the routing plan.

        Returns:
            ``[E, C, D]`` buffer; unused slots are zero.
        """
        E, C, D = plan.num_experts, plan.capacity, x.shape[1]
        token, row, _ = self._kept_assignments(plan)
        buf = x.new_zeros(E * C, D).index_copy(0, row, x.index_select(0, token))  # (E*C, D)
        return buf.view(E, C, D)  # (E, C, D)

    def compute(self, buf: Tensor) -> Tensor:
        """Run every expert on its slots.

        Args:
            buf: ``[E, C, D]`` dispatched tokens.

        Returns:
            ``[E, C, D]`` expert outputs (unused slots hold bias-only values that :meth:`combine` never reads).
        """
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), buf, self.w1))  # (E, C, H)
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (E, C, D)

    def combine(self, out: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
        """Gather expert outputs back to tokens, weighted by their gates.

        Args:
            out: ``[E, C, D]`` expert outputs.
            plan: the routing plan used by :meth:`dispatch`.
            num_tokens: N.

        Returns:
            ``[N, D]``; a token with no kept assignment gets exactly 0.
        """
        E, C, D = out.shape
        token, row, gate = self._kept_assignments(plan)
        y = out.reshape(E * C, D).index_select(0, row) * gate.to(out.dtype).unsqueeze(1)  # (M, D)
        return out.new_zeros(num_tokens, D).index_add(0, token, y)  # (N, D)

    def _forward_reference(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        out = x.new_zeros(x.shape)  # (N, D)
        for e in range(self.num_experts):
            # No skip for experts without tokens: the empty matmuls keep every parameter in the graph (zero
            # grads rather than None), exactly like the fast path, which DDP and the equivalence tests rely on.
            token, choice = ((plan.expert_index == e) & plan.kept).nonzero(as_tuple=True)  # (M_e,), (M_e,)
            h = F.gelu(x.index_select(0, token) @ self.w1[e] + self.b1[e])  # (M_e, H)
            y = h @ self.w2[e] + self.b2[e]  # (M_e, D)
            gate = plan.gates[token, choice].to(x.dtype)  # (M_e,)
            out = out.index_add(0, token, y * gate.unsqueeze(1))
        return out

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        """Apply the experts chosen by ``plan`` and sum their gated outputs per token.

        Args:
            x: ``[N, D]`` tokens.
            plan: :class:`~supermoe_rec.modules.gating.DispatchPlan` with ``[N, K]`` fields and capacity C.

        Returns:
            ``[N, D]`` combined expert outputs (no residual); exactly 0 for a token whose assignments were all
            dropped.
        """
        if self.impl is ExpertImpl.REFERENCE:
            return self._forward_reference(x, plan)
        return self.combine(self.compute(self.dispatch(x, plan)), plan, x.shape[0])


class DenseFFN(nn.Module):
    """Dense two-layer GELU FFN with the same call shape as an MoE layer's expert side, for ablations.

    For a "dense FFN of the same active size per token" as a top-K MoE with expert hidden H, use ``hidden = K * H``:
    the FLOPs per token then match the MoE's expert FLOPs (without the capacity padding).

    Dimension letters: N tokens, D model dim, H hidden width.

    Init: as :class:`BatchedExperts` (normal, std 1/sqrt(fan_in); zero biases).

    Args:
        d_model: D.
        hidden: H.
        device: where to allocate weights (``meta`` for deferred init).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> ffn = DenseFFN(d_model=8, hidden=32)
        >>> ffn(torch.randn(5, 8)).shape
        torch.Size([5, 8])
    """

    def __init__(self, d_model: int, hidden: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.hidden = hidden
        self.w1 = nn.Parameter(torch.empty(d_model, hidden, device=device))  # (D, H)
        self.b1 = nn.Parameter(torch.empty(hidden, device=device))  # (H,)
        self.w2 = nn.Parameter(torch.empty(hidden, d_model, device=device))  # (H, D)
        self.b2 = nn.Parameter(torch.empty(d_model, device=device))  # (D,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights normal with std 1/sqrt(fan_in), biases zero."""
        _init_ffn_weight(self.w1, self.d_model)
        _init_ffn_weight(self.w2, self.hidden)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``[N, D]`` tokens.

        Returns:
            ``[N, D]`` FFN output (no residual).
        """
        h = F.gelu(torch.addmm(self.b1, x, self.w1))  # (N, H)
        return torch.addmm(self.b2, h, self.w2)  # (N, D)
