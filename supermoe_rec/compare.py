"""Multi-task architectures side by side: test metrics over seeds, MTL gain per task, and the seesaw verdict.

    supermoe-rec compare --config configs/ml100k.yaml --archs supermoe,mmoe,ple --seeds 3 [--out reports/ml100k]

For every architecture and seed this trains the multi-task model and, for every task ``t``, the single-task model of
the same architecture (``data.tasks=[t]``). The MTL gain of task ``t`` is metric(multi-task) − metric(single-task)
for AUC and single-task − multi-task for RMSE, so a positive gain always means that training the tasks together
helped; it is computed per seed and averaged. An architecture is *seesaw-free* when no task's mean gain is negative.

Every run is a plain :func:`supermoe_rec.train.train` call in a fresh ``spawn`` subprocess (a world of one), so no
process-group, RNG or fused-optimizer state carries from one run to the next. Runs live in ``<out>/runs/<name>/``
(``<train.out_dir>/<name>/`` when the config sets ``train.out_dir`` to anything but ``runs``)
where the name ends with a hash of the resolved config; a run whose ``metrics.json`` holds the same config is reused
unless ``force``. Outputs next to them: ``report.json``, ``report.md`` and ``mtl_gain.png``.

Spread over seeds is the population standard deviation (``ddof=0``), defined for a single seed too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

from tqdm import tqdm

from supermoe_rec.config import (
    ARCH_SECTIONS,
    ARCH_SPECIFIC_SECTIONS,
    Arch,
    ConfigError,
    ExperimentConfig,
    TaskType,
    TrainConfig,
    from_dict,
    load_config,
    to_dict,
)
from supermoe_rec.tasks import TaskSpec

log = logging.getLogger(__name__)

STD_DDOF = 0
GAIN_PLOT = "mtl_gain.png"
ABLATIONS_MD = "ablations.md"  # written by supermoe_rec.ablate, appended to report.md
FINDINGS_MD = "findings.md"  # written by hand next to a report, appended to report.md
# single_task is the baseline every arch is measured against, not an arch to compare.
COMPARABLE_ARCHS = tuple(a for a in Arch if a is not Arch.SINGLE_TASK)
# train.* fields that say where a run's output goes, how it is logged or how fast it goes, not what it trains:
# excluded from the run's key.
_LOCATION_FIELDS = ("name", "out_dir", "num_threads", "tensorboard", "log_every")
# What an arch reads of the config beyond the shared sections is its own model sections (config.ARCH_SECTIONS): a
# run's key leaves out the other archs' sections, so tuning the encoder does not retrain the MLP baselines of a
# comparison, nor the MLP widths the transformer archs. The MoE loss weights belong to the archs with a moe section
# (the others return zero MoE losses, so the weights change nothing for them).
_MOE_LOSS_FIELDS = ("balance_loss_weight", "z_loss_weight")
# Environment of a launcher (torchrun, torchx); a compare run is always a world of one.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class CompareError(RuntimeError):
    """A run of the comparison failed or left unusable results; the message names the run and its log."""


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


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunSpec:
    """One training run: its resolved config and the key (hash of that config, location excluded) naming it."""

    cfg: ExperimentConfig
    key: str

    @property
    def name(self) -> str:
        return self.cfg.train.name

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.cfg.data.tasks


def config_key(cfg: ExperimentConfig) -> str:
    """SHA-256 of the config's values that differ from the defaults, without the output-only ``train.*`` fields
    (name, out_dir, num_threads, tensorboard, log_every) and without the ``model`` sections of other archs than
    ``model.arch`` (:data:`~supermoe_rec.config.ARCH_SECTIONS`; without a ``moe`` section, the MoE loss weights
    ``train.loss.balance_loss_weight`` / ``z_loss_weight`` go too).

    Hashing only what differs from :class:`ExperimentConfig`'s defaults keeps keys, and so finished runs, valid when
    a new option is added with a default that keeps the old behaviour. A finished run is matched by re-keying its
    stored, complete config with today's defaults (:func:`finished_metrics`), so a changed default can never make
    an old run pass for a new one.

    Args:
        cfg: a resolved config.

    Returns:
        64 hex digits; equal for two configs that train the same model on the same data.
    """
    values, defaults = to_dict(cfg), to_dict(ExperimentConfig())
    for tree in (values, defaults):
        for name in _LOCATION_FIELDS:
            tree["train"].pop(name)
        own = ARCH_SECTIONS[cfg.model.arch]
        for section in ARCH_SPECIFIC_SECTIONS:
            if section not in own:
                tree["model"].pop(section)
        if "moe" not in own:
            for name in _MOE_LOSS_FIELDS:
                tree["train"]["loss"].pop(name)
    return hashlib.sha256(json.dumps(_non_default(values, defaults), sort_keys=True).encode()).hexdigest()


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of nested ``values`` that differ from ``defaults`` (a nested dict keeps only its differences)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        default = defaults.get(name)
        if isinstance(value, dict) and isinstance(default, dict):
            if nested := _non_default(value, default):
                out[name] = nested
        elif value != default:
            out[name] = value
    return out


def make_run(base: ExperimentConfig, arch: Arch, seed: int, tasks: tuple[str, ...], runs_dir: Path) -> RunSpec:
    """The run of ``arch`` on ``tasks`` with ``seed``, everything else as in ``base``.

    ``train.loss.task_weights`` keeps only the weights of the run's tasks: a single-task twin of a run that weighs
    ``watch`` 2 trains ``like`` exactly as a twin of an unweighted run does, and shares its key (and finished run).

    Args:
        base: the resolved base config (file + overrides).
        arch: the architecture.
        seed: ``train.seed``.
        tasks: ``data.tasks`` (empty: every task of the schema).
        runs_dir: ``train.out_dir`` of the run.

    Returns:
        the run, named ``<arch>-<tasks>-seed<seed>-<key[:8]>``.
    """
    cfg = replace(base, model=replace(base.model, arch=arch), data=replace(base.data, tasks=tasks))
    loss = replace(cfg.train.loss, task_weights=cfg.trained_task_weights())
    cfg = replace(cfg, train=replace(cfg.train, seed=seed, out_dir=str(runs_dir), loss=loss))
    key = config_key(cfg)
    label = "+".join(tasks) if tasks else "all"
    cfg = replace(cfg, train=replace(cfg.train, name=f"{arch.value}-{label}-seed{seed}-{key[:8]}"))
    return RunSpec(cfg, key)


@dataclass(frozen=True)
class ArchPlan:
    """The runs one architecture needs: per seed, the multi-task run and one single-task run per task."""

    arch: Arch
    multi: dict[int, RunSpec]
    single: dict[int, dict[str, RunSpec]]


def parse_archs(archs: Sequence[str | Arch]) -> list[Arch]:
    """Architecture names (or enums) to :class:`Arch`, with an error that lists the known ones.

    Args:
        archs: names such as ``["supermoe", "mmoe"]``.

    Example::

        >>> parse_archs(["mmoe", "ple"])
        [<Arch.MMOE: 'mmoe'>, <Arch.PLE: 'ple'>]
        >>> parse_archs(["moe"])
        Traceback (most recent call last):
        ...
        supermoe_rec.config.ConfigError: --archs: 'moe' is not a known architecture (known: supermoe, ...)

    Returns:
        the architectures, in the given order.
    """
    known = ", ".join(a.value for a in COMPARABLE_ARCHS)
    if not archs:
        raise ConfigError(f"--archs: give at least one architecture (known: {known})")
    result: list[Arch] = []
    for item in archs:
        value = item.value if isinstance(item, Arch) else item.strip()
        if value == Arch.SINGLE_TASK.value:
            raise ConfigError(
                f"--archs: single_task is the baseline each architecture is measured against, not one to compare "
                f"(known: {known})"
            )
        if value not in {a.value for a in COMPARABLE_ARCHS}:
            raise ConfigError(f"--archs: {value!r} is not a known architecture (known: {known})")
        arch = Arch(value)
        if arch in result:
            raise ConfigError(f"--archs: {value!r} is listed twice")
        result.append(arch)
    return result


def plan_runs(
    base: ExperimentConfig, archs: Sequence[Arch], seeds: Sequence[int], tasks: Sequence[str], runs_dir: Path
) -> tuple[list[ArchPlan], list[RunSpec]]:
    """Every run the comparison needs, and the unique ones to train (two specs with one key train once).

    Args:
        base: the resolved base config.
        archs: architectures to compare.
        seeds: training seeds.
        tasks: the multi-task model's tasks (``base.data.tasks``, or every task when that is empty).
        runs_dir: where runs are written.

    Returns:
        ``(per-arch plans, unique runs in training order)``.
    """
    plans: list[ArchPlan] = []
    unique: dict[str, RunSpec] = {}
    for arch in archs:
        plan = ArchPlan(arch, {}, {})
        for seed in seeds:
            plan.multi[seed] = make_run(base, arch, seed, base.data.tasks, runs_dir)
            plan.single[seed] = {t: make_run(base, arch, seed, (t,), runs_dir) for t in tasks}
            for spec in (plan.multi[seed], *plan.single[seed].values()):
                unique.setdefault(spec.key, spec)
        plans.append(plan)
    return plans, list(unique.values())


# ----------------------------------------------------------------------------------------------------- running


def _metrics_path(spec: RunSpec) -> Path:
    return Path(spec.cfg.train.out_dir) / spec.name / "metrics.json"


def finished_metrics(spec: RunSpec) -> dict[str, Any] | None:
    """The metrics of a finished run of exactly this config, or None (absent, unreadable or another config).

    Args:
        spec: the run.

    Returns:
        the parsed ``metrics.json``, when it has test metrics and its config has ``spec``'s key.
    """
    path = _metrics_path(spec)
    try:
        metrics = json.loads(path.read_text())
        stored = load_config_dict(metrics["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "test" not in metrics or config_key(stored) != spec.key:
        return None
    assert isinstance(metrics, dict)
    return metrics


def load_config_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a stored mapping (``metrics.json``'s ``config``), strictly."""
    cfg: ExperimentConfig = from_dict(values, ExperimentConfig)
    return cfg


def _train_worker(cfg: ExperimentConfig, log_path: str) -> None:
    """Body of the spawned process: a world of one, output to the run's log, then :func:`train`."""
    for name in _LAUNCHER_ENV:
        os.environ.pop(name, None)  # a launcher's rank variables would make train() join the wrong group
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a") as f:
        # At the descriptor level, so C++ warnings and the run's progress bar land in the log too.
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("supermoe_rec").setLevel(logging.INFO)
    import torch.distributed as dist

    from supermoe_rec.train import train

    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_isolated(spec: RunSpec, num_threads: int = 0) -> dict[str, Any]:
    """Train ``spec`` from scratch in a fresh spawned process and return its ``metrics.json``.

    Args:
        spec: the run; its directory is emptied first, so no stale checkpoint or metrics can leak in.
        num_threads: intra-op CPU threads of the run when its config leaves ``train.num_threads`` at 0 (0: torch's
            default, every core).

    Returns:
        the run's metrics.

    Raises:
        CompareError: the run failed (the message names its log) or wrote no usable metrics.
    """
    run_dir = Path(spec.cfg.train.out_dir) / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    cfg = spec.cfg
    if num_threads and not cfg.train.num_threads:
        cfg = replace(cfg, train=replace(cfg.train, num_threads=num_threads))
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_train_worker, cfg, str(log_path)).result()
    except Exception as exc:
        raise CompareError(f"run {spec.name} failed: {type(exc).__name__}: {exc} (log: {log_path})") from exc
    metrics = finished_metrics(spec)
    if metrics is None:
        raise CompareError(f"run {spec.name} wrote no test metrics for its config (log: {log_path})")
    return metrics


def execute(
    runs: Sequence[RunSpec], force: bool = False, progress: bool = True, jobs: int = 1
) -> dict[str, tuple[dict[str, Any], bool]]:
    """Train (or reuse) every run, ``jobs`` at a time.

    Args:
        runs: unique runs.
        force: retrain even when a finished run of the same config exists.
        progress: show a progress bar over the runs.
        jobs: runs trained at once (≥ 1), each in its own process. With ``jobs > 1`` a run whose config leaves
            ``train.num_threads`` at 0 gets ``cpu_count // jobs`` threads, so the runs share the cores instead of
            fighting over them. Small models train more samples per second in total this way (two 1-thread
            runs against one 2-thread run: see README), but each run's own ``samples_per_s`` is lower.

    Returns:
        run key -> ``(metrics.json contents, reused)``.

    Raises:
        CompareError: a run failed; the runs already started are finished first.
    """
    results: dict[str, tuple[dict[str, Any], bool]] = {}
    pending: list[RunSpec] = []
    for spec in runs:
        cached = None if force else finished_metrics(spec)
        if cached is not None:
            log.info("reusing %s", spec.name)
            results[spec.key] = (cached, True)
        else:
            pending.append(spec)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    with tqdm(total=len(runs), desc="compare", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        bar.update(len(results))
        # Threads only wait here; every run trains in its own spawned process.
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_train_logged, spec, threads): spec for spec in pending}
            try:
                for future in as_completed(futures):
                    spec = futures[future]
                    results[spec.key] = (future.result(), False)
                    bar.set_postfix_str(spec.name, refresh=False)
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # started runs finish, queued ones never start
                raise
    return results


def _train_logged(spec: RunSpec, num_threads: int) -> dict[str, Any]:
    log.info("training %s", spec.name)
    return run_isolated(spec, num_threads)


# ------------------------------------------------------------------------------------------------------ report


def read_test_metric(metrics: Mapping[str, Any], task: str, metric: str, run: str) -> float:
    """``metrics.json``'s test ``task.metric`` of ``run``, or a :class:`CompareError` naming what is missing."""
    try:
        return float(metrics["test"]["tasks"][task][metric])
    except KeyError as exc:
        raise CompareError(f"run {run}: metrics.json has no test {task}.{metric}") from exc


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
    from supermoe_rec.metrics import primary_metric

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


def plot_gains(report: Report, path: Path) -> None:
    """Bar chart of the mean MTL gain (± std over seeds) per architecture, one panel per task.

    Args:
        report: the report.
        path: the PNG to write.
    """
    # The object API with the Agg canvas: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    archs = list(report["archs"])
    tasks = list(next(iter(report["archs"].values()))["tasks"])
    fig = Figure(figsize=(max(4.0, 1.2 + 0.9 * len(archs)) * len(tasks), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
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
    fig.savefig(path, dpi=110)


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


# -------------------------------------------------------------------------------------------------- entry point


def check_counts(seeds: int, jobs: int) -> None:
    """``--seeds`` and ``--jobs`` are at least 1, or a :class:`ConfigError` naming the flag."""
    if seeds < 1:
        raise ConfigError(f"--seeds: at least one seed is needed, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs: at least one, got {jobs}")


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
    (out_dir / "report.md").write_text(text)


def compare_command(
    config: str | Path,
    archs: Sequence[Arch],
    seeds: int,
    out: Path,
    force: bool,
    overrides: Sequence[str],
    jobs: int = 1,
) -> str:
    """The ``supermoe-rec compare`` command line that reproduces a comparison (shell-quoted)."""
    argv = ["supermoe-rec", "compare", "--config", str(config), "--archs", ",".join(a.value for a in archs)]
    argv += ["--seeds", str(seeds), "--out", str(out), *(["--force"] if force else [])]
    argv += [*(["--jobs", str(jobs)] if jobs > 1 else []), *overrides]
    return shlex.join(argv)


def runs_dir_of(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Where compare and ablate write their runs: ``train.out_dir`` when it is set to anything but the default
    (``runs``), else ``<out_dir>/runs`` next to the report.

    Example::

        >>> from supermoe_rec.config import apply_overrides
        >>> runs_dir_of(ExperimentConfig(), Path("reports/x")).as_posix()
        'reports/x/runs'
        >>> runs_dir_of(apply_overrides(ExperimentConfig(), ["--train.out_dir=/scratch/runs"]), Path("r")).as_posix()
        '/scratch/runs'
    """
    default = TrainConfig().out_dir
    return out_dir / "runs" if cfg.train.out_dir == default else Path(cfg.train.out_dir)


def compare(
    config: str | Path,
    archs: Sequence[str | Arch] = COMPARABLE_ARCHS,
    seeds: int = 3,
    out: str | Path | None = None,
    force: bool = False,
    overrides: Sequence[str] = (),
    progress: bool = True,
    jobs: int = 1,
) -> Report:
    """Train every architecture multi-task and single-task over seeds, and write the comparison report.

    Args:
        config: YAML config file; ``model.arch``, ``train.seed``, ``train.name`` and ``train.out_dir`` are set per
            run, ``data.tasks`` is the multi-task model's task set (empty: every task).
        archs: architectures to compare (names or :class:`Arch`); ``single_task`` is the baseline, not an arch.
        seeds: number of seeds: ``train.seed``, ``train.seed + 1``, ...
        out: report directory (default ``reports/<config file stem>``); runs go to ``<out>/runs/``, or to
            ``train.out_dir`` when the config or an override sets it (:func:`runs_dir_of`).
        force: retrain runs that already finished with the same config.
        overrides: ``--section.key=value`` config overrides applied to every run.
        progress: show a progress bar over the runs.
        jobs: runs trained at once (see :func:`execute`).

    Returns:
        the report, also written to ``<out>/report.json`` with ``report.md`` and ``mtl_gain.png``.

    Raises:
        ConfigError: an unknown architecture, fewer than one seed or job, fewer than two tasks, or a bad config.
        CompareError: a run failed.
    """
    from supermoe_rec.data.splits import load_data

    arch_list = parse_archs(archs)
    check_counts(seeds, jobs)
    base = load_config(config, overrides)
    out_dir = Path(out) if out is not None else Path("reports") / Path(config).stem
    command = compare_command(config, arch_list, seeds, out_dir, force, overrides, jobs)
    # The task names and types come from the schema; the samples themselves are loaded again in each run.
    tasks = load_data(base.data).tasks
    if len(tasks) < 2:
        raise ConfigError(
            f"data.tasks: a multi-task comparison needs at least two tasks, got {[t.name for t in tasks]}"
        )
    es_task = base.train.early_stopping_metric.partition(".")[0]
    if base.train.early_stopping_metric != "loss":
        # The single-task runs of the other tasks would have no such metric to stop on.
        raise ConfigError(
            f"train.early_stopping_metric: {base.train.early_stopping_metric!r} names task {es_task!r}, which the "
            "single-task runs of the other tasks do not have; use 'loss'"
        )
    seed_list = [base.train.seed + i for i in range(seeds)]
    plans, runs = plan_runs(base, arch_list, seed_list, [t.name for t in tasks], runs_dir_of(base, out_dir))
    results = execute(runs, force=force, progress=progress, jobs=jobs)
    report = build_report(plans, tasks, seed_list, results, base, command)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_gains(report, out_dir / GAIN_PLOT)
    write_report_markdown(out_dir)
    log.info("wrote %s", out_dir / "report.md")
    return report


__all__ = [
    "COMPARABLE_ARCHS",
    "ArchReport",
    "CompareError",
    "Report",
    "RunSpec",
    "TaskReport",
    "build_report",
    "compare",
    "config_key",
    "mean_std",
    "mtl_gains",
    "parse_archs",
    "plan_runs",
    "read_test_metric",
    "render_markdown",
    "seesaw_free",
    "summarize_task",
]
