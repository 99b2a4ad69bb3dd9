"""Seesaw study: does training the tasks together help every task, or trade one for another?

    .venv/bin/python examples/seesaw_study.py                      # 2 archs, 1 seed, small settings
    .venv/bin/python examples/seesaw_study.py --archs supermoe,mmoe,ple --seeds 3 --steps 0   # the real study

For every architecture and seed, :func:`supermoe_rec.studies.compare.compare` trains the multi-task model and one
single-task model of the same architecture per task, then reports the MTL gain per task: metric(multi-task) −
metric(single-task) for AUC and the reverse difference for RMSE, so above 0 means multi-task training helped. An
architecture is *seesaw-free* when no task's mean gain is negative (PLE's definition of the seesaw phenomenon).

The default settings (2 archs, 1 seed, tasks ``watch`` and ``rating``, 20 steps of 256 rows each) only show the
mechanics in about two minutes on 2 CPU cores; their gains are noise. Runs are cached by config, so running it again
(or the notebook ``examples/notebooks/02_seesaw_study.ipynb``, which calls the same :func:`main`) reuses them.

Outputs: ``runs/examples/seesaw/`` (or ``$SUPERMOE_EXAMPLES_OUT/seesaw``): ``report.json``, ``report.md``,
``mtl_gain.png`` and ``runs/``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from _shared import CONFIG, out_dir, quiet  # examples/ is on sys.path: run as a script, or from the notebooks

from supermoe_rec.studies.compare import compare
from supermoe_rec.studies.seesaw import Report

ARCHS = ("shared_bottom", "supermoe")
# One binary and one regression task: both gain directions, with 3 runs per arch and seed.
TASKS = ("watch", "rating")
SMALL = (
    "--model.embedding_dim=16",
    "--model.encoder.d_model=32",
    "--model.encoder.num_layers=2",
    "--model.encoder.ffn_hidden=64",
    "--model.towers.hidden=[32]",
    "--model.mlp.bottom_hidden=[64,32]",
    "--model.moe.num_experts=4",
    "--model.moe.expert_hidden=64",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
)


def study_overrides(steps: int, tasks: Sequence[str] = TASKS) -> list[str]:
    """The config overrides of the study: :data:`SMALL`, the tasks, and ``steps`` steps per run (0: full epochs)."""
    overrides = [*SMALL, f"--data.tasks=[{','.join(tasks)}]"]
    if steps > 0:
        overrides.append(f"--train.max_steps={steps}")
    return overrides


def main(
    archs: Sequence[str] = ARCHS,
    seeds: int = 1,
    steps: int = 20,
    out: Path | None = None,
    force: bool = False,
    tasks: Sequence[str] = TASKS,
) -> Report:
    """Run (or reuse) the comparison and write ``report.json``, ``report.md`` and ``mtl_gain.png`` under ``out``.

    Args:
        archs: architectures to compare (``supermoe``, ``dense_transformer``, ``shared_bottom``, ``mmoe``, ``ple``).
        seeds: seeds per architecture.
        steps: training steps per run; 0 trains ``configs/ml100k.yaml``'s epochs with early stopping.
        out: report folder (default: ``runs/examples/seesaw``).
        force: retrain runs that already finished with the same config.
        tasks: the multi-task model's tasks (at least two).

    Returns:
        the report (see :class:`supermoe_rec.studies.seesaw.Report`).
    """
    out = out or out_dir("seesaw")
    return compare(CONFIG, archs, seeds=seeds, out=out, force=force, overrides=study_overrides(steps, tasks))


def gain_frame(report: Report) -> pd.DataFrame:
    """One row per (arch, task): multi-task and single-task means, the MTL gain, and the arch's seesaw verdict."""
    rows = []
    for arch, entry in report["archs"].items():
        for task, t in entry["tasks"].items():
            rows.append(
                {
                    "arch": arch,
                    "task": task,
                    "metric": t["metric"],
                    "multi_task": t["mean"],
                    "single_task": t["single_task_mean"],
                    "mtl_gain": t["mtl_gain"],
                    "seesaw_free": entry["seesaw_free"],
                }
            )
    return pd.DataFrame(rows).set_index(["arch", "task"])


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MTL gain per task and seesaw verdict per architecture (small).")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per run; 0 = the config's full epochs")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (at least two)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default runs/examples/seesaw)")
    parser.add_argument("--force", action="store_true", help="retrain runs that already finished")
    args = parser.parse_args(argv)
    quiet()
    out = args.out or out_dir("seesaw")
    report = main(args.archs.split(","), args.seeds, args.steps, out, args.force, args.tasks.split(","))
    print(gain_frame(report).to_string(float_format=lambda x: f"{x:+.4f}" if abs(x) < 0.5 else f"{x:.4f}"))
    for name in ("report.md", "report.json", "mtl_gain.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
