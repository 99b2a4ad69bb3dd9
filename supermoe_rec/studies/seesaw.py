"""The seesaw report of a comparison: test metrics over seeds, MTL gain per task, the seesaw verdict, markdown.

The MTL gain of task ``t`` is metric(multi-task) − metric(single-task) for AUC and single-task − multi-task for
RMSE, so a positive gain always means that training the tasks together helped; it is computed per seed and averaged.
An architecture is *seesaw-free* when no task's mean gain is negative. Spread over seeds is the population standard
deviation (``ddof=0``), defined for a single seed too.

:mod:`supermoe_rec.studies.compare` plans and runs the comparison (:mod:`supermoe_rec.studies.executor`) and writes
``report.json``, ``report.md`` (:func:`write_report_markdown`) and the gain plot
(:func:`supermoe_rec.evaluation.plots.plot_gains`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from supermoe_rec.config.experiment import Arch, ExperimentConfig, TaskType, to_dict
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.data.output import write_text
from supermoe_rec.studies.executor import RunSpec, read_test_metric

STD_DDOF = 0


GAIN_PLOT = "mtl_gain.png"


ABLATIONS_MD = "ablations.md"  # written by supermoe_rec.studies.ablate, appended to report.md


FINDINGS_MD = "findings.md"  # written by hand next to a report, appended to report.md


# ------------------------------------------------------------------------------------------------ report shape


class SecondaryMetric(TypedDict):
    """Mean ± std, MTL gain and single-task mean of a non-ranking metric (GAUC of binary tasks)."""

    mean: float
    std: float
    mtl_gain: float
    single_task_mean: float


class TaskReport(TypedDict):
    """One task of one architecture in ``report.json``."""

    metric: str
    higher_is_better: bool
    mean: float
    std: float
    mtl_gain: float
    mtl_gain_std: float
    single_task_mean: float
    single_task_std: float
    per_seed: dict[str, list[float]]
    secondary: dict[str, SecondaryMetric]


class ArchReport(TypedDict):
    """One architecture in ``report.json``: its tasks, seesaw verdict, size and speed."""

    tasks: dict[str, TaskReport]
    seesaw_free: bool
    params_total: int
    params_active: int
    samples_per_s: float
    wall_s: float
    wall_s_all_runs: float


class RunInfo(TypedDict):
    """One training run the report used."""

    name: str
    arch: str
    seed: int
    tasks: list[str]
    reused: bool


class Report(TypedDict):
    """The whole ``report.json``."""

    archs: dict[str, ArchReport]
    seeds: list[int]
    config: dict[str, Any]
    command: str
    std_ddof: int
    runs: list[RunInfo]


# ----------------------------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (``ddof=0``) of per-seed values.

    Args:
        values: one value per seed; at least one.

    Example::

        >>> mean_std([1.0, 2.0, 3.0, 4.0])  # std = sqrt(1.25)
        (2.5, 1.118033988749895)

    Returns:
        ``(mean, std)``.
    """
    if not values:
        raise ValueError("mean_std needs at least one value")
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - STD_DDOF))


def mtl_gains(multi: Sequence[float], single: Sequence[float], higher_is_better: bool) -> list[float]:
    """Per-seed MTL gain: positive when the multi-task model beats the single-task model of the same structure.

    Args:
        multi: the multi-task model's metric, one value per seed.
        single: the single-task model's metric on the same seeds, in the same order.
        higher_is_better: True for AUC (gain = multi − single), False for RMSE (gain = single − multi).

    Example::

        >>> [round(g, 2) for g in mtl_gains([0.75, 0.70], [0.70, 0.72], higher_is_better=True)]
        [0.05, -0.02]
        >>> [round(g, 2) for g in mtl_gains([0.95], [1.00], higher_is_better=False)]
        [0.05]

    Returns:
        one gain per seed.
    """
    if len(multi) != len(single):
        raise ValueError(f"multi and single need one value per seed each, got {len(multi)} and {len(single)}")
    return [m - s if higher_is_better else s - m for m, s in zip(multi, single, strict=True)]


def summarize_task(
    metric: str, higher_is_better: bool, multi: Sequence[float], single: Sequence[float]
) -> tuple[float, float, float, float, float, float]:
    """Seed statistics of one task's metric for one architecture.

    Args:
        metric: the metric's name (for error messages only).
        higher_is_better: direction of the metric (see :func:`mtl_gains`).
        multi: multi-task values, one per seed.
        single: single-task values on the same seeds.

    Returns:
        ``(mean, std, mtl_gain, mtl_gain_std, single_task_mean, single_task_std)``; the gain is the mean of the
        per-seed differences.
    """
    if not multi:
        raise ValueError(f"{metric}: no seeds to summarise")
    mean, std = mean_std(multi)
    single_mean, single_std = mean_std(single)
    gain, gain_std = mean_std(mtl_gains(multi, single, higher_is_better))
    return mean, std, gain, gain_std, single_mean, single_std


def seesaw_free(gains: Mapping[str, float]) -> bool:
    """True when no task loses from multi-task training: every mean MTL gain is >= 0 (a NaN gain is not).

    Args:
        gains: task name -> mean MTL gain.

    Example::

        >>> seesaw_free({"watch": 0.01, "rating": 0.0}), seesaw_free({"watch": 0.01, "like": -0.002})
        (True, False)

    Returns:
        the verdict.
    """
    return all(g >= 0 for g in gains.values())


@dataclass(frozen=True)
class ArchPlan:
    """The runs one architecture needs: per seed, the multi-task run and one single-task run per task."""

    arch: Arch
    multi: dict[int, RunSpec]
    single: dict[int, dict[str, RunSpec]]


def build_report(
    plans: Sequence[ArchPlan],
    tasks: Sequence[TaskSpec],
    seeds: Sequence[int],
    results: Mapping[str, tuple[Mapping[str, Any], bool]],
    base: ExperimentConfig,
    command: str,
) -> Report:
    """Aggregate the runs' test metrics into the report.

    Args:
        plans: per-arch runs (from :func:`plan_runs`).
        tasks: the multi-task model's tasks, in order.
        seeds: the seeds, in order.
        results: run key -> ``(metrics.json contents, reused)`` (from :func:`execute`).
        base: the resolved base config.
        command: the command line that produced the report.

    Returns:
        the report (see :class:`Report`).
    """
    from supermoe_rec.training.metrics import primary_metric

    archs: dict[str, ArchReport] = {}
    runs: list[RunInfo] = []
    seen: set[str] = set()
    for plan in plans:
        task_reports: dict[str, TaskReport] = {}
        for task in tasks:
            metric, higher = primary_metric(task)
            names = [metric] + (["gauc"] if task.type is TaskType.BINARY else [])
            values: dict[str, tuple[list[float], list[float]]] = {}
            for name in names:
                multi_runs = [plan.multi[s] for s in seeds]
                single_runs = [plan.single[s][task.name] for s in seeds]
                multi = [read_test_metric(results[r.key][0], task.name, name, r.name) for r in multi_runs]
                single = [read_test_metric(results[r.key][0], task.name, name, r.name) for r in single_runs]
                values[name] = (multi, single)
            multi, single = values[metric]
            mean, std, gain, gain_std, single_mean, single_std = summarize_task(metric, higher, multi, single)
            secondary: dict[str, SecondaryMetric] = {}
            for name in names[1:]:
                m, sd, g, _, sm, _ = summarize_task(name, True, *values[name])
                secondary[name] = {"mean": m, "std": sd, "mtl_gain": g, "single_task_mean": sm}
            task_reports[task.name] = {
                "metric": metric,
                "higher_is_better": higher,
                "mean": mean,
                "std": std,
                "mtl_gain": gain,
                "mtl_gain_std": gain_std,
                "single_task_mean": single_mean,
                "single_task_std": single_std,
                "per_seed": {"multi_task": multi, "single_task": single, "mtl_gain": mtl_gains(multi, single, higher)},
                "secondary": secondary,
            }
        multi_metrics = [results[plan.multi[s].key][0] for s in seeds]
        params = multi_metrics[0]["params"]
        arch_runs = [plan.multi[s] for s in seeds] + [r for s in seeds for r in plan.single[s].values()]
        archs[plan.arch.value] = {
            "tasks": task_reports,
            "seesaw_free": seesaw_free({t: r["mtl_gain"] for t, r in task_reports.items()}),
            "params_total": int(params["params_total"]),
            "params_active": int(params.get("params_active_per_sample", params["params_dense_active_per_sample"])),
            "samples_per_s": mean_std([float(m["train_samples_per_s"]) for m in multi_metrics])[0],
            "wall_s": mean_std([float(m["wall_s"]) for m in multi_metrics])[0],
            "wall_s_all_runs": sum(float(results[r.key][0]["wall_s"]) for r in arch_runs),
        }
        for spec in arch_runs:
            if spec.key not in seen:
                seen.add(spec.key)
                runs.append(
                    {
                        "name": spec.name,
                        "arch": spec.cfg.model.arch.value,
                        "seed": spec.cfg.train.seed,
                        "tasks": list(spec.tasks),
                        "reused": results[spec.key][1],
                    }
                )
    return {
        "archs": archs,
        "seeds": list(seeds),
        "config": to_dict(base),
        "command": command,
        "std_ddof": STD_DDOF,
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------------------- markdown


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def _metric_label(task: TaskReport) -> str:
    """``AUC ↑`` / ``RMSE ↓``: the metric and its good direction."""
    return f"{task['metric'].upper()} {'↑' if task['higher_is_better'] else '↓'}"


def render_markdown(report: Report, plot_name: str = GAIN_PLOT) -> str:
    """The human-readable report: per-task table, seesaw verdicts, size and speed, the command, the plot.

    Args:
        report: the report.
        plot_name: file name of the gain chart, relative to the markdown file.

    Returns:
        Markdown text.
    """
    archs = report["archs"]
    tasks = list(next(iter(archs.values()))["tasks"])
    first = next(iter(archs.values()))["tasks"]
    seeds = report["seeds"]
    lines = [
        "# Multi-task comparison",
        "",
        f"Test metrics, mean ± std over seeds {seeds} (population std, ddof={report['std_ddof']}). "
        "In brackets: the MTL gain, metric(multi-task) − metric(single-task model of the same architecture) for AUC "
        "and the reverse difference for RMSE, averaged over seeds; positive means training the tasks together helped.",
        "",
        "| arch | " + " | ".join(f"{t} {_metric_label(first[t])}" for t in tasks) + " | seesaw-free |",
        "|---|" + "---|" * len(tasks) + "---|",
    ]
    for arch, entry in archs.items():
        cells = [f"{e['mean']:.4f} ± {e['std']:.4f} ({_signed(e['mtl_gain'])})" for e in entry["tasks"].values()]
        lines.append(f"| {arch} | " + " | ".join(cells) + f" | {'yes' if entry['seesaw_free'] else '**no**'} |")
    lines += ["", "## Per task", ""]
    for task in tasks:
        lines += [
            f"### {task} ({_metric_label(first[task])})",
            "",
            "| arch | multi-task | single-task | MTL gain |",
            "|---|---|---|---|",
        ]
        for arch, entry in archs.items():
            e = entry["tasks"][task]
            lines.append(
                f"| {arch} | {e['mean']:.4f} ± {e['std']:.4f} | {e['single_task_mean']:.4f} "
                f"± {e['single_task_std']:.4f} | {_signed(e['mtl_gain'])} ± {e['mtl_gain_std']:.4f} |"
            )
        for name in first[task]["secondary"]:
            parts = []
            for arch, entry in archs.items():
                sec = entry["tasks"][task]["secondary"][name]
                parts.append(f"{arch} {sec['mean']:.4f} ({_signed(sec['mtl_gain'])})")
            lines += ["", f"{name.upper()} (MTL gain in brackets): " + ", ".join(parts)]
        lines.append("")
    lines += ["## Seesaw verdict", ""]
    for arch, entry in archs.items():
        losers = [t for t, e in entry["tasks"].items() if not e["mtl_gain"] >= 0]
        verdict = (
            "seesaw-free: no task loses from multi-task training"
            if not losers
            else ("seesaw: multi-task training hurts " + ", ".join(losers))
        )
        lines.append(f"- **{arch}**: {verdict}")
    lines += [
        "",
        "## Size and speed (multi-task model)",
        "",
        "| arch | params total | params active / sample | train samples/s | wall s (one run) | wall s (all runs) |",
        "|---|---|---|---|---|---|",
    ]
    for arch, entry in archs.items():
        lines.append(
            f"| {arch} | {entry['params_total']:,} | {entry['params_active']:,} | {entry['samples_per_s']:,.0f} "
            f"| {entry['wall_s']:.1f} | {entry['wall_s_all_runs']:.1f} |"
        )
    reused = sum(r["reused"] for r in report["runs"])
    lines += [
        "",
        "## Plots",
        "",
        f"![MTL gain per task and architecture]({plot_name})",
        "",
        f"- [{plot_name}]({plot_name}): MTL gain per task and architecture (error bars: std over seeds)",
        "",
        "## Reproduce",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"{len(report['runs'])} runs ({reused} reused from earlier invocations); per-run outputs in `runs/`.",
        "",
    ]
    return "\n".join(lines)


def write_report_markdown(out_dir: Path) -> None:
    """(Re)write ``<out_dir>/report.md`` from ``report.json``, followed by ``ablations.md`` and ``findings.md`` where
    they exist (the second is written by hand: what the numbers mean and what was checked).

    ``supermoe-rec compare`` and ``supermoe-rec ablate`` both call this, so the report stays whole whichever ran last.
    """
    report: Report = json.loads((out_dir / "report.json").read_text())
    text = render_markdown(report)
    for appendix in (ABLATIONS_MD, FINDINGS_MD):
        if (out_dir / appendix).exists():
            text += "\n" + (out_dir / appendix).read_text()
    write_text(out_dir / "report.md", text)


__all__ = [
    "ABLATIONS_MD",
    "FINDINGS_MD",
    "GAIN_PLOT",
    "STD_DDOF",
    "ArchPlan",
    "ArchReport",
    "Report",
    "RunInfo",
    "SecondaryMetric",
    "TaskReport",
    "build_report",
    "mean_std",
    "mtl_gains",
    "render_markdown",
    "seesaw_free",
    "summarize_task",
    "write_report_markdown",
]
