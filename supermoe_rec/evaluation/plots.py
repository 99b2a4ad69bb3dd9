"""Every PNG the project draws: of a run (training curves, MoE expert load, per-token-kind routing), of a comparison
(MTL gain per task), of the MoE scaling study (quality and speed against parameters) and of the universality suite
(each task's primary metric per kind). Arrays or report dicts in, PNG out.

Dimension letters: Λ MoE layers, E experts, T tasks (routing rows are ``[USER]``, the T task tokens, ``history``).

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through ``pyplot``, so
plotting touches no global state (no backend switch, no open-figure registry) and is safe in servers and tests.

Example::

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "load.png"
    >>> plot_expert_load([[10, 30], [20, 20]], out).read_bytes()[:8] == PNG_SIGNATURE
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from supermoe_rec.data.output import atomic_output

if TYPE_CHECKING:
    from supermoe_rec.studies.seesaw import Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DPI = 110

__all__ = [
    "PNG_SIGNATURE",
    "plot_expert_load",
    "plot_gains",
    "plot_routing_heatmap",
    "plot_scaling",
    "plot_suite_primary",
    "plot_training_curves",
    "primary_metric_name",
    "row_normalise",
]


def _save(fig: Figure, out_png: str | Path) -> Path:
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas, so savefig never consults pyplot's backend
    with atomic_output(Path(path)) as part:
        fig.savefig(part, format="png", dpi=_DPI)
    return path


def row_normalise(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Each row divided by its sum (the share of that row's assignments per column); all-zero rows stay zero.

    Args:
        counts: [R, E] non-negative counts.

    Returns:
        [R, E] float64 rows summing to 1 (or 0 for rows without any count).

    Example::

        >>> row_normalise([[1, 3], [0, 0]]).tolist()
        [[0.25, 0.75], [0.0, 0.0]]
    """
    array = np.asarray(counts, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"counts must be [rows, experts], got shape {array.shape}")
    if (array < 0).any():
        raise ValueError("counts must be non-negative")
    sums = array.sum(axis=1, keepdims=True)  # (R, 1)
    # A token kind that never reached this layer has no distribution; show it as zeros rather than NaN.
    share: npt.NDArray[np.float64] = np.divide(array, sums, out=np.zeros_like(array), where=sums > 0)
    return share


def primary_metric_name(task_metrics: Mapping[str, Any]) -> str:
    """The metric a task is ranked by, read from its metric names: ``auc`` (binary), else ``rmse`` (regression).

    Example::

        >>> primary_metric_name({"auc": 0.7, "gauc": 0.6, "count": 10}), primary_metric_name({"rmse": 1.0})
        ('auc', 'rmse')
    """
    for name in ("auc", "rmse"):
        if name in task_metrics:
            return name
    others = [k for k in task_metrics if k != "count"]
    if not others:
        raise ValueError(f"no metric in {dict(task_metrics)}")
    return others[0]


def plot_training_curves(metrics: Mapping[str, Any], out_png: str | Path) -> Path:
    """Valid loss and each task's valid primary metric per epoch, from a run's ``metrics.json``.

    Args:
        metrics: the parsed ``metrics.json``; reads ``valid_history`` (a list of ``{"epoch", "loss", "tasks"}``)
            and marks ``best_epoch`` when present.
        out_png: where to write the PNG.

    Returns:
        The PNG path. A run without validation epochs (stopped mid-epoch) gets a figure that says so.
    """
    history: Sequence[Mapping[str, Any]] = metrics.get("valid_history") or []
    tasks = list(history[-1]["tasks"]) if history else []
    fig = Figure(figsize=(3.6 * (1 + len(tasks)), 3.2), layout="constrained")
    axes = fig.subplots(1, 1 + len(tasks), squeeze=False)[0]
    if not history:
        axes[0].text(0.5, 0.5, "no validation epochs yet", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return _save(fig, out_png)
    epochs = [int(h["epoch"]) for h in history]
    best = metrics.get("best_epoch")
    panels: list[tuple[str, list[float]]] = [("valid loss", [float(h["loss"]) for h in history])]
    for task in tasks:
        name = primary_metric_name(history[-1]["tasks"][task])
        panels.append((f"{task} {name}", [float(h["tasks"][task][name]) for h in history]))
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.plot(epochs, values, marker="o")
        if isinstance(best, int) and best in epochs:
            ax.axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_expert_load(tokens_per_expert: npt.ArrayLike, out_png: str | Path) -> Path:
    """Share of routed assignments per expert, one group of bars per MoE layer.

    A dashed line marks the uniform share 1/E: bars far from it mean a poorly balanced router.

    Args:
        tokens_per_expert: [Λ, E] assignment counts per layer and expert (``ModelOutput.tokens_per_expert``).
        out_png: where to write the PNG.

    Returns:
        The PNG path.
    """
    share = row_normalise(tokens_per_expert)  # (Λ, E)
    layers, experts = share.shape
    fig = Figure(figsize=(max(4.0, 0.45 * experts * max(layers, 1) + 2.0), 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(layers, 1)
    x = np.arange(experts)
    for layer in range(layers):
        ax.bar(x + (layer - (layers - 1) / 2) * width, share[layer], width, label=f"MoE layer {layer}")
    if experts:
        ax.axhline(1.0 / experts, color="black", linestyle="--", linewidth=1, label="uniform 1/E")
    ax.set_xticks(x)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of assignments")
    ax.set_title("expert load")
    ax.legend(fontsize="small")
    return _save(fig, out_png)


def plot_routing_heatmap(
    task_expert_counts: npt.ArrayLike,
    row_labels: Sequence[str],
    out_png: str | Path,
    title: str = "routing share per token kind",
) -> Path:
    """Per token kind (row), the share of its assignments that each expert receives.

    Rows are normalised separately (:func:`row_normalise`), so the few [USER]/task tokens are comparable with the
    many history tokens: differing rows mean the tasks route to different experts.

    Args:
        task_expert_counts: [T+2, E] counts for one MoE layer, or summed over layers.
        row_labels: T+2 names (:func:`~supermoe_rec.modules.transformer.token_kind_labels`).
        out_png: where to write the PNG.
        title: the figure title (say which layer, or that layers are summed).

    Returns:
        The PNG path.
    """
    share = row_normalise(task_expert_counts)  # (T+2, E)
    rows, experts = share.shape
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    fig = Figure(figsize=(max(4.0, 0.6 * experts + 2.5), 0.5 * rows + 1.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=max(float(share.max()), 1e-9), aspect="auto")
    for r in range(rows):
        for e in range(experts):
            # Dark text on the bright end of viridis, light text elsewhere.
            color = "black" if share[r, e] > 0.6 * share.max() else "white"
            ax.text(e, r, f"{share[r, e]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(np.arange(experts))
    ax.set_yticks(np.arange(rows), labels=list(row_labels))
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the row's assignments")
    return _save(fig, out_png)


def plot_gains(report: Report, path: Path) -> None:
    """Bar chart of the mean MTL gain (± std over seeds) per architecture, one panel per task.

    Args:
        report: the comparison's report (:class:`supermoe_rec.studies.seesaw.Report`).
        path: the PNG to write.
    """
    archs = list(report["archs"])
    tasks = list(next(iter(report["archs"].values()))["tasks"])
    fig = Figure(figsize=(max(4.0, 1.2 + 0.9 * len(archs)) * len(tasks), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        entries = [report["archs"][a]["tasks"][task] for a in archs]
        gains = [e["mtl_gain"] for e in entries]
        ax.bar(
            range(len(archs)),
            gains,
            yerr=[e["mtl_gain_std"] for e in entries],
            capsize=4,
            color=["tab:green" if g >= 0 else "tab:red" for g in gains],
        )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(archs)), archs, rotation=30, ha="right")
        direction = "multi − single" if entries[0]["higher_is_better"] else "single − multi"
        ax.set_title(f"{task} ({entries[0]['metric'].upper()}: {direction})")
        ax.set_ylabel("MTL gain")
    fig.suptitle(f"MTL gain per task, mean ± std over {len(report['seeds'])} seed(s); above 0: multi-task helps")
    _save(fig, path)


def plot_scaling(summary: Mapping[str, Any], out_png: str | Path) -> Path:
    """Quality (one panel per task) against total parameters, and samples/s against total parameters beside it.

    Args:
        summary: the MoE scaling study's summary (:func:`supermoe_rec.studies.scale.summarize`).
        out_png: the PNG to write.
    """
    arms = summary["arms"]
    tasks = list(next(iter(arms.values()))["tasks"])
    fig = Figure(figsize=(4.2 * (len(tasks) + 1), 3.6), layout="constrained")
    axes = fig.subplots(1, len(tasks) + 1, squeeze=False)
    styles = {"aux_loss": "o", "bias": "s", "none": "^"}
    for i, task in enumerate([*tasks, None]):
        ax = axes[0][i]
        for name, a in arms.items():
            x = a["params_total"]
            balance = name.rsplit("_", 1)[-1] if name != "dense" else None
            marker = "*" if name == "dense" else styles.get(balance or "", "o")
            shared = (a["shape"] or {}).get("num_shared_experts", 0)
            color = "black" if name == "dense" else ("tab:orange" if shared else "tab:blue")
            if task is None:
                ax.scatter([x], [a["samples_per_s"]], marker=marker, color=color)
            else:
                c = a["tasks"][task]
                ax.errorbar([x], [c["mean"]], yerr=[c["std"]], fmt=marker, color=color, capsize=2)
            ax.annotate(name, (x, a["samples_per_s"] if task is None else a["tasks"][task]["mean"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("total parameters")
        ax.set_title(
            "train samples/s" if task is None else f"{task} ({arms[next(iter(arms))]['tasks'][task]['metric']})"
        )
    fig.suptitle(
        "MoE scaling at fixed active parameters (blue: no shared expert, orange: 1 shared; o aux_loss, s bias)"
    )
    return _save(fig, out_png)


def plot_suite_primary(result: Mapping[str, Any], out_png: str | Path) -> Path:
    """Bar chart of each task's primary metric per kind and model family; error bars from ``result["std"]`` when
    present.

    Args:
        result: a universality suite result (:func:`supermoe_rec.evaluation.suite.suite_run` or
            :func:`~supermoe_rec.evaluation.suite.aggregate_suites`): ``tasks`` (each with its ``primary`` metric),
            ``embeddings``, ``families`` and, for an aggregate, ``std``.
        out_png: the PNG to write.
    """
    tasks = list(result["tasks"])
    kinds = list(result["embeddings"])
    families = list(result["families"])
    std = result.get("std", {}).get("embeddings", {})
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(5.0 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    width = 0.8 / len(families)
    x = np.arange(len(kinds))
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        metric = result["tasks"][task]["primary"]
        for j, family in enumerate(families):
            key = f"{family}_{metric}"
            heights = [result["embeddings"][k].get(task, {}).get(key, np.nan) for k in kinds]
            errors = [std.get(k, {}).get(task, {}).get(key, 0.0) for k in kinds] if std else None
            ax.bar(x + (j - (len(families) - 1) / 2) * width, heights, width, yerr=errors, label=family, capsize=2)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.set_xticks(x, kinds, rotation=45, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for i in range(len(tasks), rows * cols):
        axes[i // cols][i % cols].set_visible(False)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(result.get("title", "universality suite"), fontsize=11)
    return _save(fig, out_png)
