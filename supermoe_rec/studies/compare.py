"""Multi-task architectures side by side: test metrics over seeds, MTL gain per task, and the seesaw verdict.

    supermoe-rec compare --config configs/ml100k.yaml --archs supermoe,mmoe,ple --seeds 3 [--out reports/ml100k]

For every architecture and seed this trains the multi-task model and, for every task ``t``, the single-task model of
the same architecture (``data.tasks=[t]``). The MTL gain of task ``t`` is metric(multi-task) − metric(single-task)
for AUC and single-task − multi-task for RMSE, so a positive gain always means that training the tasks together
helped; it is computed per seed and averaged. An architecture is *seesaw-free* when no task's mean gain is negative.

Every run is a plain :func:`supermoe_rec.training.trainer.train` call in a fresh ``spawn`` subprocess (a world of one),
so no
process-group, RNG or fused-optimizer state carries from one run to the next. Runs live in ``<out>/runs/<name>/``
(``<train.out_dir>/<name>/`` when the config sets ``train.out_dir`` to anything but ``runs``)
where the name ends with a hash of the resolved config; a run whose ``metrics.json`` holds the same config is reused
unless ``force``. Outputs next to them: ``report.json``, ``report.md`` and ``mtl_gain.png``.

Spread over seeds is the population standard deviation (``ddof=0``), defined for a single seed too.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path

from supermoe_rec.config.experiment import Arch, ConfigError, ExperimentConfig, load_config
from supermoe_rec.data.output import write_text
from supermoe_rec.evaluation.plots import plot_gains
from supermoe_rec.studies.executor import RunSpec, check_counts, execute, make_run, runs_dir_of
from supermoe_rec.studies.seesaw import GAIN_PLOT, ArchPlan, Report, build_report, write_report_markdown

log = logging.getLogger(__name__)

# single_task is the baseline every arch is measured against, not an arch to compare.
COMPARABLE_ARCHS = tuple(a for a in Arch if a is not Arch.SINGLE_TASK)


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
        supermoe_rec.config.base.ConfigError: --archs: 'moe' is not a known architecture (known: supermoe, ...)

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
        RunError: a run failed (:class:`supermoe_rec.studies.executor.RunError`).
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
    write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_gains(report, out_dir / GAIN_PLOT)
    write_report_markdown(out_dir)
    log.info("wrote %s", out_dir / "report.md")
    return report


__all__ = ["COMPARABLE_ARCHS", "compare", "compare_command", "parse_archs", "plan_runs"]
