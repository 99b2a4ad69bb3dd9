"""Expert FFNs stored as batched weights, plus the dense FFN twin used by ablations.

Dimension letters: N tokens, M model dim, H expert hidden width, E experts, K top-k, C capacity (slots per expert).

:class:`BatchedExperts` runs the E two-layer GELU FFNs ``y = gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` on the
tokens a :class:`~supermoe_rec.modules.gating.DispatchPlan` sends them, and combines the outputs weighted by the
gates. Two implementations, selected by :class:`ExpertImpl`, must agree (outputs and gradients):

- ``FAST``, with a capacity (the capacity path): scatter kept assignments into an ``[E, C, M]`` buffer, two
  ``torch.bmm`` calls, gather back. Work is ``E * C ~= capacity_factor * N * K`` rows, so compute per token depends
  on K, not on E.
- ``FAST``, dropless (``plan.dropless``, the dropless fast path): the N*K assignments are sorted by expert and run
  as one grouped matmul over contiguous segments (:func:`grouped_backend` picks how): ``torch._grouped_mm`` on CUDA
  under bf16 (no padding); on CPU, where ``torch._grouped_mm``'s backward fails in torch 2.13, either the padded
  ``[E, C_max, M]`` bmm (C_max the largest segment) or a loop of one ``addmm`` per non-empty segment, whichever
  ``benchmarks/moe_layer.py`` measured faster for the shape (:data:`LOOP_MAX_EXPERTS`). The sorted rows are
  gathered and scattered by permutation functions whose backward is another permutation, so no ``index_add``
  runs in the backward.
- ``REFERENCE``: a plain Python loop over experts with ``index_select`` / ``index_add``; it ignores buffer
  positions entirely, so it also checks the slot bookkeeping of the fast path.

The fast path is split into :meth:`BatchedExperts.dispatch`, :meth:`BatchedExperts.compute` and
:meth:`BatchedExperts.combine` so that expert parallelism can insert an all-to-all around ``compute``; it also
overrides :meth:`BatchedExperts.globalize` and :meth:`BatchedExperts.reduce_statistic`, the two places where a
layer's losses and statistics become global.
"""

from __future__ import annotations

import enum
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from supermoe_rec.modules.gating import DispatchPlan, RouterOutput


class ExpertImpl(str, enum.Enum):
    """Which expert implementation :class:`BatchedExperts` runs."""

    FAST = "fast"
    REFERENCE = "reference"


class GroupedBackend(str, enum.Enum):
    """How the dropless fast path runs its grouped matmul (``BatchedExperts.grouped_backend``)."""

    AUTO = "auto"  # grouped_backend(): grouped_mm on CUDA under bf16, else loop for E <= LOOP_MAX_EXPERTS, else bmm
    BMM = "bmm"  # padded [E, C_max, M] buffer and torch.bmm
    LOOP = "loop"  # one addmm per non-empty expert segment
    GROUPED_MM = "grouped_mm"  # torch._grouped_mm (CUDA, bf16)


# On the 2-core CPU dev machine (benchmarks/moe_layer.py, M=64, H=128, 4096 tokens, K=2) the segment loop beats the
# padded bmm up to this many experts; above it the loop's per-expert dispatch overhead dominates. See BENCHMARKS.md.
LOOP_MAX_EXPERTS = 16


def grouped_mm_available(device: torch.device) -> bool:
    """``torch._grouped_mm`` exists and the device is CUDA (the only place its backward works in torch 2.13)."""
    return device.type == "cuda" and hasattr(torch, "_grouped_mm")


def grouped_backend(requested: GroupedBackend, num_experts: int, x: Tensor) -> GroupedBackend:
    """The backend the dropless fast path uses for ``num_experts`` experts on ``x`` (``AUTO`` resolved).

    Example::

        >>> x = torch.zeros(1)  # on CPU
        >>> grouped_backend(GroupedBackend.AUTO, 4, x).value, grouped_backend(GroupedBackend.AUTO, 64, x).value
        ('loop', 'bmm')
    """
    if requested is not GroupedBackend.AUTO:
        return requested
    bf16 = x.dtype == torch.bfloat16 or (
        x.device.type == "cuda"
        and torch.is_autocast_enabled("cuda")
        and torch.get_autocast_dtype("cuda") == torch.bfloat16
    )
    if grouped_mm_available(x.device) and bf16:
        return GroupedBackend.GROUPED_MM
    return GroupedBackend.LOOP if num_experts <= LOOP_MAX_EXPERTS else GroupedBackend.BMM


class _DispatchSorted(torch.autograd.Function):
    """``x_sorted = x[order // K]``: each token repeated K times, in expert-sorted order. Backward: gather with the
    inverse permutation and sum the K copies (no index_add)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, token: Tensor, inverse: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        K = ctx.top_k
        g = grad.index_select(0, inverse)  # (N*K, M) token-major
        return g.view(-1, K, g.shape[1]).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """``y = x[perm]`` for a permutation ``perm``; backward ``g[inverse]`` (no index_add)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _init_ffn_weight(weight: Tensor, fan_in: int) -> None:
    # LeCun-normal (std = 1/sqrt(fan_in)): keeps activation variance roughly constant through each matmul at the
    # small widths this project uses (M=64); a fixed std of 0.02 would shrink the FFN output ~10x at M=64.
    nn.init.normal_(weight, std=1.0 / math.sqrt(fan_in))


class BatchedExperts(nn.Module):
    """E GELU FFN experts with batched weights ``w1 [E, M, H]``, ``b1 [E, H]``, ``w2 [E, H, M]``, ``b2 [E, M]``.

    Dimension letters: N tokens, M model dim, H expert hidden, E experts, K top-k, C capacity.

    Init: weights normal with std ``1/sqrt(fan_in)`` (fan_in M for w1, H for w2), biases zero. The same init as
    :class:`DenseFFN`, so dense-vs-MoE ablations start alike.

    Args:
        d_model: M.
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
        self.grouped_backend = GroupedBackend.AUTO
        # Set by supermoe_rec.modules.moe_stats.collect_stats: count non-positive hidden pre-activations (GELU "off").
        self.collect_stats = False
        self.last_activity: tuple[Tensor, int] | None = None  # (inactive count, hidden units seen) of the last call
        self._slot_used: Tensor | None = None  # (E, C) real slots of the current capacity-path call, for the stats
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden, device=device))  # (E, M, H)
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden, device=device))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model, device=device))  # (E, H, M)
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, device=device))  # (E, M)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights normal with std 1/sqrt(fan_in), biases zero."""
        _init_ffn_weight(self.w1, self.d_model)
        _init_ffn_weight(self.w2, self.hidden)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def _record_activity(self, pre: Tensor, rows: Tensor | None = None) -> None:
        """Remember how many hidden pre-activations of real rows are <= 0 (where GELU is ~0)."""
        with torch.no_grad():
            off = (pre <= 0).sum(dim=-1)  # per row
            if rows is not None:
                off = off.masked_select(rows)
            self.last_activity = (off.sum(), int(off.numel()) * self.hidden)

    def globalize(self, route: RouterOutput) -> RouterOutput:
        """The router output these experts run on and the layer reports: here this process's own.

        Experts split over a process group (``supermoe_rec.distributed.expert_parallel``) override this to agree
        one capacity and compute the losses and statistics over the group's global batch.
        """
        return route

    def reduce_statistic(self, counts: Tensor) -> Tensor:
        """A routing statistic of this process's tokens, summed over every process these experts serve (here one)."""
        return counts

    @staticmethod
    def _kept_assignments(plan: DispatchPlan) -> tuple[Tensor, Tensor, Tensor]:
        """Token index, buffer row (``e * C + position``) and gate of every kept assignment, each ``[A]``."""
        K = plan.expert_index.shape[1]
        kept = plan.kept.reshape(-1).nonzero().squeeze(1)  # (A,) flat n*K + k of kept assignments
        token = torch.div(kept, K, rounding_mode="floor")  # (A,)
        row = (plan.expert_index.reshape(-1) * plan.capacity + plan.position.reshape(-1)).index_select(0, kept)
        gate = plan.gates.reshape(-1).index_select(0, kept)  # (A,)
        return token, row, gate

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        """Scatter kept assignments into the expert buffer.

        Args:
            x: ``[N, M]`` tokens.
            plan: the routing plan.

        Returns:
            ``[E, C, M]`` buffer; unused slots are zero.
        """
        E, C, M = plan.num_experts, plan.capacity, x.shape[1]
        token, row, _ = self._kept_assignments(plan)
        buf = x.new_zeros(E * C, M).index_copy(0, row, x.index_select(0, token))  # (E*C, M)
        return buf.view(E, C, M)  # (E, C, M)

    def compute(self, buf: Tensor) -> Tensor:
        """Run every expert on its slots.

        Args:
            buf: ``[E, C, M]`` dispatched tokens.

        Returns:
            ``[E, C, M]`` expert outputs (unused slots hold bias-only values that :meth:`combine` never reads).
        """
        pre = torch.baddbmm(self.b1.unsqueeze(1), buf, self.w1)  # (E, C, H)
        if self.collect_stats:
            self._record_activity(pre, self._slot_used)
        return torch.baddbmm(self.b2.unsqueeze(1), F.gelu(pre), self.w2)  # (E, C, M)

    def combine(self, out: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
        """Gather expert outputs back to tokens, weighted by their gates.

        Args:
            out: ``[E, C, M]`` expert outputs.
            plan: the routing plan used by :meth:`dispatch`.
            num_tokens: N.

        Returns:
            ``[N, M]``; a token with no kept assignment gets exactly 0.
        """
        E, C, M = out.shape
        token, row, gate = self._kept_assignments(plan)
        y = out.reshape(E * C, M).index_select(0, row) * gate.to(out.dtype).unsqueeze(1)  # (A, M)
        return out.new_zeros(num_tokens, M).index_add(0, token, y)  # (N, M)

    def _forward_reference(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        out = x.new_zeros(x.shape)  # (N, M)
        for e in range(self.num_experts):
            # No skip for experts without tokens: the empty matmuls keep every parameter in the graph (zero
            # grads rather than None), exactly like the fast path, which DDP and the equivalence tests rely on.
            token, choice = ((plan.expert_index == e) & plan.kept).nonzero(as_tuple=True)  # (A_e,), (A_e,)
            h = F.gelu(x.index_select(0, token) @ self.w1[e] + self.b1[e])  # (A_e, H)
            y = h @ self.w2[e] + self.b2[e]  # (A_e, M)
            gate = plan.gates[token, choice].to(x.dtype)  # (A_e,)
            out = out.index_add(0, token, y * gate.unsqueeze(1))
        return out

    def forward(self, x: Tensor, plan: DispatchPlan) -> Tensor:
        """Apply the experts chosen by ``plan`` and sum their gated outputs per token.

        Args:
            x: ``[N, M]`` tokens.
            plan: :class:`~supermoe_rec.modules.gating.DispatchPlan` with ``[N, K]`` fields and capacity C.

        Returns:
            ``[N, M]`` combined expert outputs (no residual); exactly 0 for a token whose assignments were all
            dropped.
        """
        if self.impl is ExpertImpl.REFERENCE:
            return self._forward_reference(x, plan)
        backend = grouped_backend(self.grouped_backend, self.num_experts, x) if plan.dropless else GroupedBackend.BMM
        if backend is not GroupedBackend.BMM and x.shape[0] > 0:
            return self._forward_sorted(x, plan, backend)
        self._slot_used = None
        if self.collect_stats:  # which [E, C] slots hold a real assignment
            used = torch.bincount(plan.expert_index[plan.kept], minlength=self.num_experts)  # (E,)
            self._slot_used = torch.arange(plan.capacity, device=x.device) < used.unsqueeze(1)  # (E, C)
        return self.combine(self.compute(self.dispatch(x, plan)), plan, x.shape[0])

    def _forward_sorted(self, x: Tensor, plan: DispatchPlan, backend: GroupedBackend) -> Tensor:
        """The dropless fast path: every assignment kept, rows sorted by expert, one grouped matmul."""
        N, K = plan.expert_index.shape
        M = x.shape[1]
        flat = plan.expert_index.reshape(-1)  # (N*K,) token-major: row n*K + k
        order = torch.argsort(flat, stable=True)  # (N*K,) sorted row -> assignment
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,)
        token = torch.div(order, K, rounding_mode="floor")  # (N*K,) token of each sorted row
        x_sorted = cast(Tensor, _DispatchSorted.apply(x, token, inverse, K))  # type: ignore[no-untyped-call]
        if backend is GroupedBackend.GROUPED_MM:
            y_sorted = self._grouped_mm(x_sorted, counts, flat.index_select(0, order))
        else:
            y_sorted = self._segment_loop(x_sorted, counts)  # (N*K, M)
        y = cast(Tensor, _Permute.apply(y_sorted, inverse, order)).view(N, K, M)  # type: ignore[no-untyped-call]
        return (y * plan.gates.to(y.dtype).unsqueeze(2)).sum(dim=1)  # (N, M)

    def _segment_loop(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """One ``addmm`` pair per non-empty expert segment of the sorted rows."""
        outs = []
        inactive, seen = x_sorted.new_zeros((), dtype=torch.int64), 0
        sizes = [int(c) for c in counts.tolist()]
        for e, (rows, n) in enumerate(zip(torch.split(x_sorted, sizes), sizes, strict=True)):
            if n == 0:
                continue
            pre = torch.addmm(self.b1[e], rows, self.w1[e])  # (n, H)
            if self.collect_stats:
                with torch.no_grad():
                    inactive, seen = inactive + (pre <= 0).sum(), seen + pre.numel()
            outs.append(torch.addmm(self.b2[e], F.gelu(pre), self.w2[e]))  # (n, M)
        if self.collect_stats:
            self.last_activity = (inactive, seen)
        return torch.cat(outs)

    def _grouped_mm(self, x_sorted: Tensor, counts: Tensor, expert_sorted: Tensor) -> Tensor:
        """``torch._grouped_mm`` over the segments (CUDA, bf16): no padding, one kernel per matmul."""
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) segment ends
        dtype = torch.bfloat16
        with torch.autocast(x_sorted.device.type, enabled=False):
            pre = torch._grouped_mm(x_sorted.to(dtype), self.w1.to(dtype), offs=offs)  # (A, H)
            pre = pre + self.b1.to(dtype).index_select(0, expert_sorted)
            if self.collect_stats:
                self._record_activity(pre)
            y = torch._grouped_mm(F.gelu(pre), self.w2.to(dtype), offs=offs)  # (A, M)
            y = y + self.b2.to(dtype).index_select(0, expert_sorted)
        return y.to(x_sorted.dtype)


class DenseFFN(nn.Module):
    """Dense two-layer GELU FFN with the same call shape as an MoE layer's expert side, for ablations.

    For a "dense FFN of the same active size per token" as a top-K MoE with expert hidden H, use ``hidden = K * H``:
    the FLOPs per token then match the MoE's expert FLOPs (without the capacity padding).

    Dimension letters: N tokens, M model dim, H hidden width.

    Init: as :class:`BatchedExperts` (normal, std 1/sqrt(fan_in); zero biases).

    Args:
        d_model: M.
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
        self.w1 = nn.Parameter(torch.empty(d_model, hidden, device=device))  # (M, H)
        self.b1 = nn.Parameter(torch.empty(hidden, device=device))  # (H,)
        self.w2 = nn.Parameter(torch.empty(hidden, d_model, device=device))  # (H, M)
        self.b2 = nn.Parameter(torch.empty(d_model, device=device))  # (M,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights normal with std 1/sqrt(fan_in), biases zero."""
        _init_ffn_weight(self.w1, self.d_model)
        _init_ffn_weight(self.w2, self.hidden)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``[N, M]`` tokens.

        Returns:
            ``[N, M]`` FFN output (no residual).
        """
        h = F.gelu(torch.addmm(self.b1, x, self.w1))  # (N, H)
        return torch.addmm(self.b2, h, self.w2)  # (N, M)
