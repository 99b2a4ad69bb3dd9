"""Ablations of the SUPERMOE model: one switch changed at a time, valid and test metrics side by side.

    supermoe-rec ablate --config configs/ml100k.yaml [--seeds 1] [--jobs 2] [--out reports/ml100k] [--variants A,B]

Each variant is the multi-task ``supermoe`` run of ``--config`` with a few overrides (:data:`VARIANTS`): task
tokens off, one router shared by all token kinds, top-1 routing, 4 or 16 experts, uncertainty weighting, and the
two other choices made on valid for ml100k (candidate interaction, encoder dropout). Runs share ``<out>/runs/``
and the run keys of :mod:`supermoe_rec.studies.executor`, so the ``default`` variant is the multi-task ``supermoe`` run
of
a comparison in the same directory and is reused, not trained again.

Outputs: ``ablations.json`` and ``ablations.md`` in ``<out>``. When ``<out>/report.json`` exists (a comparison was
run there), its ``report.md`` is rewritten to include the ablation table.

Choices are judged on **valid** (the table's first columns, at each run's best epoch); test is shown so the report
is complete, never to pick a variant.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from supermoe_rec.config.experiment import Arch, ConfigError, load_config
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.data.output import write_text
from supermoe_rec.studies.executor import RunSpec, check_counts, execute, make_run, read_test_metric, runs_dir_of
from supermoe_rec.studies.seesaw import ABLATIONS_MD, mean_std, write_report_markdown
from supermoe_rec.training.metrics import primary_metric

log = logging.getLogger(__name__)

# name -> overrides on top of the base config. "default" must stay first and empty: the others are read against it.
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "no_task_tokens": ("--model.encoder.use_task_tokens=false",),
    "shared_router": ("--model.moe.task_routers=false",),
    "top1_routing": ("--model.moe.top_k=1",),
    "experts_4": ("--model.moe.num_experts=4",),
    "experts_16": ("--model.moe.num_experts=16",),
    "uncertainty_weighting": ("--train.loss.uncertainty_weighting=true",),
    "watch_weight_2": ("--train.loss.task_weights={watch: 2}",),  # loss-weight balance, by hand
    "no_item_interaction": ("--model.encoder.item_interaction=false",),
    "no_dropout": ("--model.encoder.dropout=0",),
    # Not a switch of the model: is the epoch budget what binds (valid still improving at the last epoch)?
    "epochs_10": ("--train.epochs=10",),
}
ABLATIONS_JSON = "ablations.json"


def select_variants(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``default`` plus the named :data:`VARIANTS`, in the table's order.

    Raises:
        ConfigError: a name that is not a variant (the message lists them).
    """
    wanted = {n.strip() for n in names if n.strip()}
    unknown = sorted(wanted - set(VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    return {name: extra for name, extra in VARIANTS.items() if name == "default" or name in wanted}


def best_valid(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The valid result of the epoch whose weights were tested (``best_epoch``).

    Args:
        metrics: a run's ``metrics.json``.

    Returns:
        that epoch's entry of ``valid_history``, or None when the run never finished an epoch (``train.max_steps``
        stopped it first, so it was never evaluated on valid).
    """
    for entry in metrics.get("valid_history", []):
        if entry.get("epoch") == metrics.get("best_epoch"):
            return dict(entry)
    return None


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean over seeds, or None when any seed has no value."""
    present = [v for v in values if v is not None]
    return mean_std(present)[0] if present and len(present) == len(values) else None


def plan_variants(
    config: str | Path, overrides: Sequence[str], variants: Mapping[str, Sequence[str]], seeds: int, runs_dir: Path
) -> dict[str, list[RunSpec]]:
    """Variant name -> one multi-task ``supermoe`` run per seed."""
    plan: dict[str, list[RunSpec]] = {}
    for name, extra in variants.items():
        base = load_config(config, [*overrides, *extra])
        plan[name] = [
            make_run(base, Arch.SUPERMOE, base.train.seed + i, base.data.tasks, runs_dir) for i in range(seeds)
        ]
    return plan


def summarize(
    plan: Mapping[str, Sequence[RunSpec]],
    results: Mapping[str, tuple[dict[str, Any], bool]],
    tasks: Sequence[TaskSpec],
    variants: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """``ablations.json``: per variant, its overrides and per task the valid and test means over seeds."""
    out: dict[str, Any] = {}
    for name, specs in plan.items():
        runs = [results[s.key][0] for s in specs]
        entry: dict[str, Any] = {"overrides": list(variants[name]), "runs": [s.name for s in specs], "tasks": {}}
        for task in tasks:
            metric, higher = primary_metric(task)
            valid = [None if (v := best_valid(r)) is None else v["tasks"][task.name][metric] for r in runs]
            test = [read_test_metric(r, task.name, metric, s.name) for r, s in zip(runs, specs, strict=True)]
            entry["tasks"][task.name] = {
                "metric": metric,
                "higher_is_better": higher,
                "valid": _mean(valid),  # None: some run was never evaluated on valid
                "test": _mean(test),
            }
        entry["best_epoch"] = [r["best_epoch"] for r in runs]
        entry["params_total"] = runs[0]["params"]["params_total"]
        entry["params_active"] = runs[0]["params"]["params_active_per_sample"]
        out[name] = entry
    return out


def render_ablations(summary: Mapping[str, Any], seeds: int, command: str) -> str:
    """Markdown table: valid (with the change against ``default``) and test per task, per variant."""
    default = summary["default"]["tasks"]
    tasks = list(default)
    lines = [
        "## Ablations (supermoe, multi-task)",
        "",
        f"One switch changed at a time from the config, mean over {seeds} seed(s). **Valid** metrics at each run's "
        "best epoch, with the change against `default` in brackets (positive: better), then test. Choices are made on "
        "valid only.",
        "",
        "| variant | overrides | "
        + " | ".join(f"{t} valid {default[t]['metric'].upper()}" for t in tasks)
        + " | "
        + " | ".join(f"{t} test" for t in tasks)
        + " | best epoch | params total / active |",
        "|---|---|" + "---|" * (2 * len(tasks)) + "---|---|",
    ]
    for name, entry in summary.items():
        cells = []
        for t in tasks:
            e, d = entry["tasks"][t], default[t]
            if e["valid"] is None:
                cells.append("n/a (never evaluated)")
            elif name == "default" or d["valid"] is None:
                cells.append(f"{e['valid']:.4f}")
            else:
                better = (e["valid"] - d["valid"]) * (1 if e["higher_is_better"] else -1)
                cells.append(f"{e['valid']:.4f} ({better:+.4f})")
        cells += [f"{entry['tasks'][t]['test']:.4f}" for t in tasks]
        overrides = " ".join(f"`{o}`" for o in entry["overrides"]) or "(config as is)"
        epochs = ", ".join(str(e) for e in entry["best_epoch"])
        lines.append(
            f"| {name} | {overrides} | "
            + " | ".join(cells)
            + f" | {epochs} | {entry['params_total']:,} / {entry['params_active']:,} |"
        )
    lines += ["", "Reproduce:", "", "```", command, "```", ""]
    return "\n".join(lines)


def ablate(
    config: str | Path,
    seeds: int = 1,
    out: str | Path | None = None,
    force: bool = False,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    progress: bool = True,
    variants: Mapping[str, Sequence[str]] = VARIANTS,
) -> dict[str, Any]:
    """Train (or reuse) every variant and write ``ablations.json`` / ``ablations.md`` (and refresh ``report.md``).

    Args:
        config: YAML config file; its ``model.arch`` is replaced by ``supermoe``.
        seeds: seeds per variant: ``train.seed``, ``train.seed + 1``, ...
        out: report directory (default ``reports/<config file stem>``); runs go to ``<out>/runs/``.
        force: retrain runs that already finished with the same config.
        overrides: ``--section.key=value`` overrides applied to every variant.
        jobs: runs trained at once (see :func:`supermoe_rec.studies.executor.execute`).
        progress: show a progress bar over the runs.
        variants: name -> overrides; must contain ``default``.

    Returns:
        the ``ablations.json`` contents.

    Raises:
        ConfigError: fewer than one seed or job, no ``default`` variant, or a bad config or override.
        RunError: a run failed.
    """
    from supermoe_rec.data.splits import load_data

    check_counts(seeds, jobs)
    if "default" not in variants:
        raise ConfigError("ablations need a 'default' variant to compare against")
    out_dir = Path(out) if out is not None else Path("reports") / Path(config).stem
    base = load_config(config, overrides)
    tasks = load_data(base.data).tasks
    plan = plan_variants(config, overrides, variants, seeds, runs_dir_of(base, out_dir))
    unique = list({s.key: s for specs in plan.values() for s in specs}.values())
    results = execute(unique, force=force, progress=progress, jobs=jobs)
    summary = summarize(plan, results, tasks, variants)
    argv = ["supermoe-rec", "ablate", "--config", str(config), "--seeds", str(seeds), "--out", str(out_dir)]
    argv += ["--jobs", str(jobs)] if jobs > 1 else []
    if dict(variants) != VARIANTS:
        argv += ["--variants", ",".join(name for name in variants if name != "default")]
    argv += overrides
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / ABLATIONS_JSON, json.dumps(summary, indent=2) + "\n")
    write_text(out_dir / ABLATIONS_MD, render_ablations(summary, seeds, shlex.join(argv)))
    if (out_dir / "report.json").exists():
        write_report_markdown(out_dir)
    log.info("wrote %s", out_dir / ABLATIONS_MD)
    return summary


__all__ = ["VARIANTS", "ablate", "best_valid", "render_ablations", "select_variants", "summarize"]
