"""MoE diagnostics: per-expert load, dead experts, inactive expert-FFN units and routing entropy per token kind.

Dimension letters: E experts, R token kinds (for SUPERMOE: ``[USER]``, each task token, history), N tokens.

Collection is off by default (it costs an ``[N, E]`` entropy and an ``[rows, H]`` comparison per MoE layer). Turn it
on for the forwards you want to measure, then read and reset::

    set_collect_stats(model, True)
    ...  # forwards (training steps or an evaluation pass)
    stats = read_stats(model, kind_labels=["[USER]", "watch", "like", "rating", "history"])
    set_collect_stats(model, False)

The trainer does this on its logging steps (TensorBoard scalars from :func:`tensorboard_scalars`) and ``export``
over the valid split (``routing.json``'s ``diagnostics``).

Definitions (per MoE layer, over the accumulated tokens):

- ``load``: assignments per expert, before capacity dropping (sums to tokens * K);
- ``dead_experts``: experts whose load is under :data:`DEAD_FRACTION` (10%) of the uniform load ``sum(load) / E``;
- ``zero_activation_fraction``: share of the routed experts' hidden pre-activations that are <= 0, i.e. where GELU
  is (close to) zero (real assignments only; padding slots are not counted);
- ``routing_entropy``: mean over the tokens of each kind of ``-sum_e p_e log p_e`` (nats) of the router's
  probabilities (``log E`` is uniform routing, 0 is a single expert).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from supermoe_rec.modules.moe import MoELayer

DEAD_FRACTION = 0.1

__all__ = [
    "DEAD_FRACTION",
    "MoEStatsAccumulator",
    "read_stats",
    "reset_stats",
    "set_collect_stats",
    "tensorboard_scalars",
]


class MoEStatsAccumulator:
    """Running sums of one MoE layer's diagnostics (plain tensors, not module state: never saved or broadcast).

    Args:
        num_experts: E.
        num_kinds: R (0: the layer has no token kinds; entropy is then reported over all tokens as ``all``).
    """

    def __init__(self, num_experts: int, num_kinds: int) -> None:
        self.num_experts = num_experts
        self.num_kinds = num_kinds
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        R = max(self.num_kinds, 1)
        self.load = torch.zeros(self.num_experts, dtype=torch.float64)  # (E,)
        self.entropy_sum = torch.zeros(R, dtype=torch.float64)  # (R,)
        self.kind_tokens = torch.zeros(R, dtype=torch.float64)  # (R,)
        self.inactive = 0.0
        self.units = 0.0
        self.forwards = 0

    @torch.no_grad()
    def add(
        self,
        tokens_per_expert: Tensor,
        entropy: Tensor | None,
        kinds: Tensor | None,
        activity: tuple[Tensor, int] | None,
    ) -> None:
        """Accumulate one forward.

        Args:
            tokens_per_expert: ``[E]`` assignments per expert.
            entropy: ``[N]`` routing entropy per token, or ``None``.
            kinds: ``[N]`` int64 token kind in ``[0, R)``, or ``None`` (all tokens one kind).
            activity: ``(inactive count, hidden units seen)`` of the experts, or ``None``.
        """
        self.forwards += 1
        self.load += tokens_per_expert.detach().double().cpu()
        if entropy is not None and entropy.numel() > 0:
            R = max(self.num_kinds, 1)
            k = (
                kinds.long()
                if kinds is not None and self.num_kinds > 0
                else torch.zeros_like(entropy, dtype=torch.long)
            )
            self.entropy_sum += torch.bincount(k, weights=entropy.double(), minlength=R)[:R].cpu()
            self.kind_tokens += torch.bincount(k, minlength=R)[:R].double().cpu()
        if activity is not None:
            self.inactive += float(activity[0])
            self.units += float(activity[1])

    def summary(self, kind_labels: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready diagnostics of what was accumulated (see the module docstring)."""
        E = self.num_experts
        total = float(self.load.sum())
        uniform = total / E if E else 0.0
        load = self.load.tolist()
        R = max(self.num_kinds, 1)
        labels = list(kind_labels) if kind_labels is not None and len(kind_labels) == R else None
        if labels is None:
            labels = ["all"] if self.num_kinds == 0 else [f"kind{r}" for r in range(R)]
        entropy = {
            labels[r]: (float(self.entropy_sum[r] / self.kind_tokens[r]) if self.kind_tokens[r] > 0 else None)
            for r in range(R)
        }
        return {
            "num_experts": E,
            "forwards": self.forwards,
            "load": load,
            "load_share": [v / total if total else 0.0 for v in load],
            "max_load_over_uniform": (max(load) / uniform) if uniform else None,
            "dead_experts": sum(1 for v in load if v < DEAD_FRACTION * uniform) if total else None,
            "dead_threshold": DEAD_FRACTION,
            "zero_activation_fraction": self.inactive / self.units if self.units else None,
            "routing_entropy": entropy,
            "routing_entropy_uniform": math.log(E) if E else 0.0,
        }


def _moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    # Recognised by what they carry, not by class: moe.py imports this module, so importing MoELayer here (even
    # lazily) would close an import cycle (tests/test_imports.py).
    return [
        (name, m)  # type: ignore[misc]
        for name, m in model.named_modules()
        if isinstance(getattr(m, "stats", None), MoEStatsAccumulator) and hasattr(m, "router") and hasattr(m, "experts")
    ]


def set_collect_stats(model: nn.Module, enabled: bool) -> int:
    """Turn diagnostics collection on or off in every MoE layer (router and experts) of ``model``.

    Returns:
        the number of MoE layers.
    """
    layers = _moe_layers(model)
    for _, layer in layers:
        layer.collect_stats = enabled
        layer.router.collect_stats = enabled
        layer.experts.collect_stats = enabled
    return len(layers)


def reset_stats(model: nn.Module) -> None:
    """Forget the accumulated diagnostics of every MoE layer."""
    for _, layer in _moe_layers(model):
        layer.stats.reset()


def read_stats(model: nn.Module, kind_labels: Sequence[str] | None = None, reset: bool = True) -> list[dict[str, Any]]:
    """Every MoE layer's diagnostics since the last reset, in ``named_modules`` order.

    Args:
        model: any module containing MoE layers (DMP/DDP wrappers too).
        kind_labels: names of the R token kinds, e.g. ``["[USER]", *task_names, "history"]``.
        reset: reset the sums after reading.

    Returns:
        one dict per layer (:meth:`MoEStatsAccumulator.summary` plus ``layer``, the module's name).
    """
    out = []
    for name, layer in _moe_layers(model):
        entry = {"layer": name, **layer.stats.summary(kind_labels)}
        out.append(entry)
        if reset:
            layer.stats.reset()
    return out


def tensorboard_scalars(stats: Sequence[dict[str, Any]], prefix: str = "moe") -> dict[str, float]:
    """Flatten :func:`read_stats` into TensorBoard scalars: ``{prefix}/layer{i}/...``.

    Per layer: ``dead_experts``, ``max_load_over_uniform``, ``zero_activation_fraction``, ``entropy/{kind}`` and
    the per-expert load share ``load/e{e}`` (for at most 64 experts; larger layers log the max and dead count only).
    """
    scalars: dict[str, float] = {}
    for i, layer in enumerate(stats):
        base = f"{prefix}/layer{i}"
        for key in ("dead_experts", "max_load_over_uniform", "zero_activation_fraction"):
            if layer.get(key) is not None:
                scalars[f"{base}/{key}"] = float(layer[key])
        for kind, value in layer["routing_entropy"].items():
            if value is not None:
                scalars[f"{base}/entropy/{kind}"] = float(value)
        if layer["num_experts"] <= 64 and layer["forwards"]:
            for e, share in enumerate(layer["load_share"]):
                scalars[f"{base}/load/e{e}"] = float(share)
    return scalars
