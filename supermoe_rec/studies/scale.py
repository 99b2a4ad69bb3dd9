"""The MoE scaling study: dense vs fine-grained MoE at fixed active parameters, over seeds.

    supermoe-rec scale --config configs/ml100k.yaml --seeds 2 [--jobs 2] [--out reports]

Arms (all at the active parameters per MoE layer of the config's own MoE shape, by default today's E=8, K=2, H=128):

- ``dense``: the ``dense_transformer`` twin (its would-be MoE blocks are dense FFNs of width K*H);
- ``e{E}_s{S}_{balance}`` for E in ``--experts`` (default 4, 16, 64), S in ``--shared`` (0, 1) shared experts and
  ``balance`` in ``--balance`` (``aux_loss``, ``bias``): K and H from
  :func:`~supermoe_rec.modules.moe_recipe.choose_expert_shape` (fine-grained: K grows with E, H shrinks, the total
  parameters grow), printed before training.

Every run is a :func:`supermoe_rec.studies.executor.make_run` run in ``<out>/moe_scaling/runs/`` (finished runs with
the same
config are reused). Outputs in ``<out>``: ``moe_scaling.json``, ``moe_scaling.md`` (per task the test metric mean and
std per arm, its difference from dense in units of the pooled std and the verdict: **wins** above +2 std, **loses**
below -2 std, else **ties**) and ``moe_scaling.png`` (quality against total parameters, samples/s beside it).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supermoe_rec.config.experiment import Arch, ConfigError, ExperimentConfig, load_config
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.data.output import write_text
from supermoe_rec.evaluation.plots import plot_scaling
from supermoe_rec.modules.moe_recipe import ExpertShape, active_params, choose_expert_shape
from supermoe_rec.studies.executor import RunSpec, check_counts, execute, make_run, read_test_metric
from supermoe_rec.studies.seesaw import mean_std
from supermoe_rec.training.metrics import primary_metric

log = logging.getLogger(__name__)

SCALING_JSON = "moe_scaling.json"
SCALING_MD = "moe_scaling.md"
SCALING_PNG = "moe_scaling.png"
WIN_STD = 2.0
BALANCES = ("aux_loss", "bias")


@dataclass(frozen=True)
class Arm:
    """One arm of the study: its architecture, overrides and (for MoE arms) the chosen shape."""

    name: str
    arch: Arch
    overrides: tuple[str, ...]
    shape: ExpertShape | None


def plan_arms(
    base: ExperimentConfig,
    experts: Sequence[int] = (4, 16, 64),
    shared: Sequence[int] = (0, 1),
    balances: Sequence[str] = BALANCES,
) -> list[Arm]:
    """``dense`` then every (E, S, balance) arm, at the base config's active parameters per MoE layer."""
    moe, d_model = base.model.moe, base.model.encoder.d_model
    target = active_params(d_model, moe.num_experts, moe.top_k, moe.expert_hidden, moe.num_shared_experts)
    arms = [Arm("dense", Arch.DENSE_TRANSFORMER, (), None)]
    for e in experts:
        for s in shared:
            shape = choose_expert_shape(d_model, target, e, num_shared=s)
            for balance in balances:
                if balance not in ("aux_loss", "bias", "none"):
                    raise ConfigError(f"--balance: unknown {balance!r} (aux_loss, bias, none)")
                overrides = (*shape.overrides(), f"--model.moe.load_balance={balance}")
                arms.append(Arm(f"e{e}_s{s}_{balance}", Arch.SUPERMOE, overrides, shape))
    return arms


def plan_runs(
    config: str | Path, overrides: Sequence[str], arms: Sequence[Arm], seeds: int, runs_dir: Path
) -> dict[str, list[RunSpec]]:
    """Arm name -> one multi-task run per seed."""
    plan: dict[str, list[RunSpec]] = {}
    for arm in arms:
        cfg = load_config(config, [*overrides, *arm.overrides])
        plan[arm.name] = [make_run(cfg, arm.arch, cfg.train.seed + i, cfg.data.tasks, runs_dir) for i in range(seeds)]
    return plan


def _pooled(a: float, b: float) -> float:
    return math.sqrt((a * a + b * b) / 2)


def summarize(
    arms: Sequence[Arm],
    plan: Mapping[str, Sequence[RunSpec]],
    results: Mapping[str, tuple[dict[str, Any], bool]],
    tasks: Sequence[TaskSpec],
) -> dict[str, Any]:
    """``moe_scaling.json``: per arm its shape, parameters, samples/s and per task the test mean/std, and the
    difference from dense in pooled std with the verdict."""
    out: dict[str, Any] = {"win_std": WIN_STD, "arms": {}}
    for arm in arms:
        specs = plan[arm.name]
        runs = [results[s.key][0] for s in specs]
        entry: dict[str, Any] = {
            "arch": arm.arch.value,
            "overrides": list(arm.overrides),
            "shape": None if arm.shape is None else {
                "num_experts": arm.shape.num_experts, "top_k": arm.shape.top_k,
                "expert_hidden": arm.shape.expert_hidden, "num_shared_experts": arm.shape.num_shared_experts,
                "moe_layer_active": arm.shape.active, "moe_layer_total": arm.shape.total,
            },
            "runs": [s.name for s in specs],
            "params_total": runs[0]["params"]["params_total"],
            "params_active": runs[0]["params"]["params_active_per_sample"],
            "samples_per_s": mean_std([float(r["train_samples_per_s"]) for r in runs])[0],
            "tasks": {},
        }  # fmt: skip
        for task in tasks:
            metric, higher = primary_metric(task)
            values = [read_test_metric(r, task.name, metric, s.name) for r, s in zip(runs, specs, strict=True)]
            mean, std = mean_std(values)
            entry["tasks"][task.name] = {"metric": metric, "higher_is_better": higher, "mean": mean, "std": std,
                                         "values": values}  # fmt: skip
        out["arms"][arm.name] = entry
    dense = out["arms"].get("dense")
    verdicts: list[dict[str, Any]] = []
    for name, entry in out["arms"].items():
        if name == "dense" or dense is None:
            continue
        for task, t in entry["tasks"].items():
            d = dense["tasks"][task]
            diff = t["mean"] - d["mean"]
            better = diff if t["higher_is_better"] else -diff
            pooled = _pooled(t["std"], d["std"])
            z = better / pooled if pooled > 0 else (math.inf if better > 0 else -math.inf if better < 0 else 0.0)
            verdict = "wins" if z > WIN_STD else "loses" if z < -WIN_STD else "ties"
            t.update({"vs_dense": diff, "vs_dense_std": z, "verdict": verdict})
        verdicts.append({"arm": name, **{task: t["verdict"] for task, t in entry["tasks"].items()}})
    primary = tasks[0].name if tasks else None
    winners = [
        v["arm"] for v in verdicts
        if primary is not None and v[primary] == "wins" and all(v[t.name] != "loses" for t in tasks)
    ]  # fmt: skip
    out["aim"] = {
        "statement": f"one MoE arm beats dense by more than {WIN_STD:g} std on {primary} without losing on the others",
        "met_by": winners,
    }
    return out


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def render_markdown(summary: Mapping[str, Any], seeds: int, command: str) -> str:
    """The report: one table (test mean ± std and the verdict against dense per task), then the plain summary."""
    arms = summary["arms"]
    tasks = list(next(iter(arms.values()))["tasks"])
    lines = [
        "# MoE scaling at fixed active parameters",
        "",
        f"Test metrics, mean ± std over {seeds} seed(s) (population std). Each MoE cell also gives its difference "
        f"from `dense` in units of the pooled std of the two arms, and the verdict: **wins** above "
        f"+{WIN_STD:g} std, **loses** below -{WIN_STD:g} std, else ties. Positive is better for every metric.",
        "",
        f"Command: `{command}`",
        "",
        "| arm | E | K | H | shared | params total | params active | samples/s | "
        + " | ".join(f"{t} {arms['dense']['tasks'][t]['metric'] if 'dense' in arms else ''}" for t in tasks)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(tasks),
    ]
    for name, a in arms.items():
        s = a["shape"] or {}
        cells = []
        for t in tasks:
            c = a["tasks"][t]
            cell = f"{_fmt(c['mean'])} ± {_fmt(c['std'])}"
            if "verdict" in c:
                cell += f" ({c['vs_dense_std']:+.1f} std, {c['verdict']})"
            cells.append(cell)
        lines.append(
            f"| {name} | {s.get('num_experts', '')} | {s.get('top_k', '')} | {s.get('expert_hidden', '')} | "
            f"{s.get('num_shared_experts', '')} | {a['params_total']:,} | {a['params_active']:,} | "
            f"{a['samples_per_s']:,.0f} | " + " | ".join(cells) + " |"
        )
    lines += ["", "## Where MoE wins, ties or loses", ""]
    for task in tasks:
        groups: dict[str, list[str]] = {"wins": [], "ties": [], "loses": []}
        for name, a in arms.items():
            if name != "dense" and "verdict" in a["tasks"][task]:
                groups[a["tasks"][task]["verdict"]].append(f"{name} ({a['tasks'][task]['vs_dense_std']:+.1f})")
        lines.append(
            f"- **{task}**: wins: {', '.join(groups['wins']) or 'none'}; ties: {', '.join(groups['ties']) or 'none'}; "
            f"loses: {', '.join(groups['loses']) or 'none'}."
        )
    aim = summary["aim"]
    met = ", ".join(aim["met_by"]) if aim["met_by"] else "no arm"
    lines += ["", f"Aim ({aim['statement']}): met by {met}.", "", f"![quality and samples/s]({SCALING_PNG})", ""]
    return "\n".join(lines)


def scale(
    config: str | Path,
    seeds: int = 2,
    out: str | Path = "reports",
    force: bool = False,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    progress: bool = True,
    experts: Sequence[int] = (4, 16, 64),
    shared: Sequence[int] = (0, 1),
    balances: Sequence[str] = BALANCES,
) -> dict[str, Any]:
    """Print the chosen shapes, train (or reuse) every arm and seed, and write the report (module docstring).

    Raises:
        ConfigError: fewer than one seed or job, a bad config, override or balance name.
        RunError: a run failed.
    """
    from supermoe_rec.data.splits import load_data

    check_counts(seeds, jobs)
    out_dir = Path(out)
    base = load_config(config, overrides)
    arms = plan_arms(base, experts, shared, balances)
    for arm in arms:
        print(f"{arm.name}: " + (arm.shape.describe() if arm.shape else f"{Arch.DENSE_TRANSFORMER.value} twin"))
    tasks = load_data(base.data).tasks
    plan = plan_runs(config, overrides, arms, seeds, out_dir / "moe_scaling" / "runs")
    unique = list({s.key: s for specs in plan.values() for s in specs}.values())
    results = execute(unique, force=force, progress=progress, jobs=jobs)
    summary = summarize(arms, plan, results, tasks)
    argv = ["supermoe-rec", "scale", "--config", str(config), "--seeds", str(seeds), "--out", str(out_dir)]
    argv += ["--jobs", str(jobs)] if jobs > 1 else []
    argv += ["--experts", *map(str, experts), "--shared", *map(str, shared), "--balance", *balances]
    argv += overrides
    summary["command"] = shlex.join(argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / SCALING_JSON, json.dumps(summary, indent=2) + "\n")
    write_text(out_dir / SCALING_MD, render_markdown(summary, seeds, summary["command"]))
    plot_scaling(summary, out_dir / SCALING_PNG)
    log.info("wrote %s", out_dir / SCALING_MD)
    return summary


__all__ = ["Arm", "plan_arms", "plan_runs", "render_markdown", "scale", "summarize"]
