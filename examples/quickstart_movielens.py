"""Quickstart: train SUPERMOE on MovieLens-100k (ml100k-mt), read the per-task metrics, export and look at users.

    .venv/bin/python examples/quickstart_movielens.py --steps 30

Small settings (a 2-layer encoder, 4 experts, ``--steps`` steps of 256 rows), so the whole script runs in about a
minute on 2 CPU cores; drop them and use ``supermoe-rec train --config configs/ml100k.yaml`` for the real thing.
What it does:

1. trains the ``supermoe`` arch with :func:`supermoe_rec.training.trainer.train` (planned sharding, DMP, TorchRec's
pipeline,
   a world of one) and prints the per-task test table;
2. exports every user's ``[USER]`` and task representations with :func:`supermoe_rec.evaluation.export.export_run`
   (``user_embeddings.parquet``, ``routing.json``, ``expert_load.png``, ``routing_heatmap.png``);
3. projects the user representations to 2-D (PCA) and colours them by a user attribute (gender or age bucket).

Outputs: ``runs/examples/quickstart/`` (or ``$SUPERMOE_EXAMPLES_OUT/quickstart``). The notebook
``examples/notebooks/01_quickstart_movielens.ipynb`` runs the same functions step by step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch.distributed as dist
from _shared import CONFIG, out_dir, quiet  # examples/ is on sys.path: run as a script, or from the notebooks
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from supermoe_rec.config.experiment import DataConfig, ExperimentConfig, load_config
from supermoe_rec.data.movielens import fetch_movielens
from supermoe_rec.data.protocol import AGE_EDGES
from supermoe_rec.data.splits import SplitData, load_data
from supermoe_rec.evaluation.export import ExportResult, UserRepresentations, export_run
from supermoe_rec.training.trainer import results_table
from supermoe_rec.training.trainer import train as train_run

# Small enough for a laptop minute; the arch and the protocol are the real ones.
SMALL = (
    "--model.embedding_dim=16",
    "--model.encoder.d_model=32",
    "--model.encoder.num_layers=2",
    "--model.encoder.num_heads=4",
    "--model.encoder.ffn_hidden=64",
    "--model.towers.hidden=[32]",
    "--model.moe.num_experts=4",
    "--model.moe.expert_hidden=64",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
)
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


@dataclass
class QuickstartResult:
    """What :func:`main` produced.

    Attributes:
        run_dir: the training run's folder (config, plan, metrics, checkpoints, exports).
        metrics: the run's ``metrics.json``; ``metrics["test"]["tasks"]`` holds the per-task test metrics.
        table: the per-task test table as printed by ``supermoe-rec train``.
        export: the export (user representations and the files written).
        projection_png: the 2-D projection of the user representations.
    """

    run_dir: Path
    metrics: dict[str, Any]
    table: str
    export: ExportResult
    projection_png: Path


def quickstart_config(
    steps: int, out: Path, name: str = "quickstart", overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """``configs/ml100k.yaml`` with the :data:`SMALL` settings, ``steps`` training steps, and its outputs in ``out``.

    A quickstart is meant to be run again: each run replaces the previous one of the same name
    (``train.overwrite``; a training run otherwise refuses a run dir that already holds a run).
    """
    settings = [*SMALL, f"--train.max_steps={steps}", f"--train.out_dir={out}", f"--train.name={name}"]
    return load_config(CONFIG, [*settings, "--train.overwrite=true", *overrides])


def metrics_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """Per-task test metrics of a ``metrics.json`` as a table (one row per task)."""
    return pd.DataFrame(metrics["test"]["tasks"]).T


def user_attributes(cfg: DataConfig) -> pd.DataFrame:
    """MovieLens users with ``gender`` and ``age_bucket`` (the protocol's buckets), indexed by ``user_id``."""
    users = fetch_movielens(cfg.source, cfg.cache_dir, cfg.try_url, cfg.url_timeout_s).users
    bucket = np.searchsorted(np.asarray(AGE_EDGES), users["age"].to_numpy(), side="right")
    out = pd.DataFrame(
        {"gender": users["gender"].to_numpy(), "age_bucket": np.asarray(AGE_LABELS)[bucket]},
        index=pd.Index(users["user_id"].to_numpy(), name="user_id"),
    )
    return out


def project_2d(vectors: npt.NDArray[np.float32], seed: int = 0) -> npt.NDArray[np.float64]:
    """[U, M] representations -> [U, 2] coordinates on their first two principal components."""
    coords: npt.NDArray[np.float64] = PCA(n_components=2, random_state=seed).fit_transform(vectors.astype(np.float64))
    return coords


def plot_user_projection(reps: UserRepresentations, attributes: pd.DataFrame, colour_by: str, out_png: Path) -> Path:
    """Scatter of the users' ``[USER]`` representations on their first two principal components.

    Args:
        reps: exported representations (``reps.user_keys`` index ``attributes``).
        attributes: per-user attributes (:func:`user_attributes`).
        colour_by: a column of ``attributes`` (``gender`` or ``age_bucket``).
        out_png: where to write the PNG.
    """
    coords = project_2d(reps.user)  # (U, 2)
    groups = attributes.loc[reps.user_keys, colour_by].to_numpy()
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)  # the object API, no pyplot: no global backend state
    ax = fig.subplots()
    order = AGE_LABELS if colour_by == "age_bucket" else sorted(set(groups))
    for value in [v for v in order if v in set(groups)]:
        mask = groups == value
        ax.scatter(coords[mask, 0], coords[mask, 1], s=8, alpha=0.7, label=f"{value} ({int(mask.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{len(coords)} users' [USER] representations, by {colour_by}")
    ax.legend(fontsize="small", markerscale=2)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def main(
    steps: int = 30, out: Path | None = None, colour_by: str = "gender", data: SplitData | None = None
) -> QuickstartResult:
    """Train, print the per-task test table, export the users and draw their 2-D projection.

    Args:
        steps: training steps (256 rows each).
        out: output folder (default: :func:`_shared.out_dir` ``("quickstart")``).
        colour_by: ``gender`` or ``age_bucket``.
        data: the ml100k-mt splits when already loaded (they are loaded otherwise).
    """
    out = out or out_dir("quickstart")
    cfg = quickstart_config(steps, out)
    data = data or load_data(cfg.data)
    metrics = train_run(cfg, data)
    table = results_table(metrics["test"], data.tasks)
    run_dir = out / cfg.train.name
    export = export_run(run_dir, data=data)
    png = plot_user_projection(
        export.representations, user_attributes(cfg.data), colour_by, run_dir / f"users_by_{colour_by}.png"
    )
    return QuickstartResult(run_dir, metrics, table, export, png)


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train SUPERMOE on ml100k-mt (small), export and plot the users.")
    parser.add_argument("--steps", type=int, default=30, help="training steps of 256 rows")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/examples/quickstart)")
    parser.add_argument("--colour-by", choices=["gender", "age_bucket"], default="gender")
    args = parser.parse_args(argv)
    quiet()
    try:
        result = main(args.steps, args.out, args.colour_by)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # train() already printed the per-task test table.
    for path in [*result.export.files, result.projection_png]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
