"""Export a trained run's user representations, routing statistics and plots.

    supermoe-rec export --run runs/<name> [--out path] [--section.key=value ...]

Writes into the run directory (the parquet path can be moved with ``--out``):

- ``user_embeddings.parquet``: one row per user with ``user_id``, ``user`` (the [USER] representation, list<float>
  of length M), one ``task_<name>`` column per task (that task's representation) and ``source_split``;
- ``routing.json``: MoE routing counts accumulated over the valid split (models with MoE layers only);
- ``expert_load.png``, ``routing_heatmap.png`` (from ``routing.json``) and ``curves.png`` (from ``metrics.json``).

Dimension letters: U users, M model dim, T tasks, E experts, Λ MoE layers.

**Which history.** A user is represented by their latest history as of the end of train: the first valid sample
where the user has one (its history is the last ``max_history`` train items), else the user's last train sample
(by timestamp, then stored position). The representation reads only the history (and the profile, when the run
has one), never the sample's candidate item, so this is a property of the user, not of a sample.

**Batch dependence.** In eval mode a capacity-limited MoE can still drop assignments when an expert is
overloaded, and capacity depends on the batch, so a user's vector depends slightly on which users share its batch.
Batches are fixed (users in key order within their source split, ``train.eval_batch_size`` per batch), so exports
are deterministic; pass ``--model.moe.dropless=true`` to make every user's vector independent of its batch (the
parameters are the same, so the checkpoint still loads).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from tqdm import tqdm

from supermoe_rec.config.experiment import Arch, ConfigError, ExperimentConfig, load_config
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.jagged import IntArray
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.output import atomic_output, check_output, write_json
from supermoe_rec.data.splits import SplitData, load_run_data
from supermoe_rec.distributed.process_group import init_distributed
from supermoe_rec.distributed.sharding import build_train_module, shard
from supermoe_rec.evaluation import plots
from supermoe_rec.models.train_module import StepOutput
from supermoe_rec.modules.moe_stats import read_stats, reset_stats, set_collect_stats
from supermoe_rec.modules.transformer import token_kind_labels
from supermoe_rec.training.checkpoint import CheckpointManager, TrainState

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# Archs whose encoder has a [USER] token (and task tokens); the MLP baselines have no user representation.
REPRESENTATION_ARCHS = (Arch.SUPERMOE, Arch.DENSE_TRANSFORMER)
EMBEDDINGS_FILE = "user_embeddings.parquet"
ROUTING_FILE = "routing.json"


@dataclass
class UserRepresentations:
    """Representations of every user, in ascending user-key order.

    Attributes:
        user_keys: [U] the schema's user column values (``user_id`` on MovieLens).
        user: [U, M] float32 [USER] representations.
        tasks: task name -> [U, M] float32 task representations.
        source_split: [U] the split whose sample gave each user's history ("valid" or "train").
    """

    user_keys: npt.NDArray[Any]
    user: FloatArray
    tasks: dict[str, FloatArray]
    source_split: npt.NDArray[np.str_]


@dataclass
class RestoredModel:
    """A trained run's model restored for inference in a world of one: sharded by DMP, without optimizers.

    Attributes:
        cfg: the run's config (with the export's overrides).
        data: the run's data.
        dmp: the DMP-wrapped train module (model + loss), weights from the run's checkpoint.
        loaders: one loader per split, batched as the trainer's evaluation (``train.eval_batch_size``, in order).
    """

    cfg: ExperimentConfig
    data: SplitData
    dmp: DistributedModelParallel
    loaders: dict[str, ShardedBatchLoader] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What :func:`export_run` produced: the representations, the checkpoint used ("best"/"latest"), the files."""

    representations: UserRepresentations
    embeddings_path: Path
    checkpoint: str
    routing: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- choosing rows


def _edge_rows(ds: TabularDataset, last: bool) -> tuple[npt.NDArray[Any], IntArray]:
    """Each user's first (``last=False``) or last sample of ``ds`` by (timestamp, stored row).

    Returns:
        (user keys [U'], row of each user's sample [U']), keys ascending.
    """
    n = len(ds)
    position = np.arange(n, dtype=np.int64)
    # Stored rows keep the input's (user, time) order within a user, so they break timestamp ties in time order.
    time = ds.timestamps if ds.timestamps is not None else np.zeros(n, dtype=np.int64)
    order = np.lexsort((position, time))  # ascending (timestamp, row)
    if last:
        order = order[::-1]
    keys = ds.user_keys[order]
    # np.unique's return_index is the first occurrence in `keys`, i.e. the first (or last) sample of each user.
    unique, first = np.unique(keys, return_index=True)
    return unique, order[first].astype(np.int64)


def latest_rows(data: SplitData) -> dict[str, tuple[npt.NDArray[Any], IntArray]]:
    """Per split, the users represented from it and their sample rows (see the module docstring).

    Args:
        data: the run's splits; ``train`` is required, ``valid`` is used where present.

    Returns:
        ``{"valid": (keys, rows), "train": (keys, rows)}`` with disjoint users; a user present only in ``test``
        has no history as of the end of train and is left out (logged).
    """
    out: dict[str, tuple[npt.NDArray[Any], IntArray]] = {}
    covered: npt.NDArray[Any] = np.zeros(0, dtype=data.splits["train"].user_keys.dtype)
    if "valid" in data.splits:
        keys, rows = _edge_rows(data.splits["valid"], last=False)
        out["valid"] = (keys, rows)
        covered = keys
    keys, rows = _edge_rows(data.splits["train"], last=True)
    fresh = ~np.isin(keys, covered)
    out["train"] = (keys[fresh], rows[fresh])
    if "test" in data.splits:
        seen = np.concatenate([k for k, _ in out.values()])
        test_only = np.setdiff1d(np.unique(data.splits["test"].user_keys), seen)
        if len(test_only):
            log.warning(
                "%d user(s) appear only in test: no history as of the end of train, not exported", len(test_only)
            )
    return out


# --------------------------------------------------------------------------------------------------- inference


def forward_batch(restored: RestoredModel, batch: Any) -> StepOutput:
    """One forward pass of the restored train module over ``batch`` (its loss ignored): the model's outputs.

    The caller chooses the mode (``restored.dmp.eval()``) and wraps it in ``torch.no_grad()``.
    """
    _, out = restored.dmp(batch)
    assert isinstance(out, StepOutput)
    return out


def user_representations(restored: RestoredModel, batch_size: int | None = None) -> UserRepresentations:
    """[USER] and task representations of every user at their latest history (model in eval mode, no grad).

    Args:
        restored: a world-of-one model whose weights are restored (:func:`restore_model`).
        batch_size: users per forward pass (default ``train.eval_batch_size``).

    Returns:
        :class:`UserRepresentations`, users in ascending key order.
    """
    batch_size = batch_size or restored.cfg.train.eval_batch_size
    task_names = [t.name for t in restored.data.tasks]
    keys_parts, split_parts, user_parts = [], [], []
    task_parts: dict[str, list[FloatArray]] = {name: [] for name in task_names}
    chosen = latest_rows(restored.data)
    total = sum(len(rows) for _, rows in chosen.values())
    restored.dmp.eval()
    with torch.no_grad(), tqdm(total=total, desc="export users", unit="user", dynamic_ncols=True) as bar:
        for split, (keys, rows) in chosen.items():
            ds = restored.data.splits[split]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                # Every row is its own group, so representation g belongs to chunk[g].
                out = forward_batch(restored, ds.batch(chunk)).model
                if out.user is None or out.task_representations is None:
                    raise ConfigError(f"model.arch: {restored.cfg.model.arch.value} returned no user representation")
                user_parts.append(out.user.float().cpu().numpy())  # (G, M)
                reps = out.task_representations.float().cpu().numpy()  # (G, T, M)
                for t, name in enumerate(task_names):
                    task_parts[name].append(reps[:, t])
                bar.update(len(chunk))
            keys_parts.append(keys)
            split_parts.append(np.full(len(keys), split))
    restored.dmp.train()
    keys = np.concatenate(keys_parts)
    order = np.argsort(keys, kind="stable")
    return UserRepresentations(
        user_keys=keys[order],
        user=np.concatenate(user_parts)[order],
        tasks={name: np.concatenate(parts)[order] for name, parts in task_parts.items()},
        source_split=np.concatenate(split_parts)[order],
    )


def routing_statistics(restored: RestoredModel, split: str = "valid") -> dict[str, Any] | None:
    """MoE routing counts summed over ``split``, batched as in evaluation (whole groups, eval batch size).

    Returns:
        ``None`` when the model has no MoE layer, else a JSON-ready dict: ``tokens_per_expert`` [Λ, E] and
        ``task_expert_counts`` [Λ, T+2, E] (assignments before capacity dropping), ``row_labels`` (T+2 token kinds),
        ``dropped_fraction`` (mean over batches, weighted by assignments), ``split``, ``samples``, and
        ``diagnostics``: per MoE layer the load, dead experts, zero-activation fraction and routing entropy per
        token kind (:func:`supermoe_rec.modules.moe_stats.read_stats`).
    """
    loader = restored.loaders[split]
    loader.set_epoch(0)
    tokens: torch.Tensor | None = None
    kinds: torch.Tensor | None = None
    dropped, weight = 0.0, 0.0
    restored.dmp.eval()
    labels = token_kind_labels([t.name for t in restored.data.tasks])
    set_collect_stats(restored.dmp, True)
    reset_stats(restored.dmp)
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"routing ({split})", unit="batch", dynamic_ncols=True):
            out = forward_batch(restored, batch).model
            if out.tokens_per_expert is None or out.task_expert_counts is None or out.tokens_per_expert.shape[0] == 0:
                set_collect_stats(restored.dmp, False)
                restored.dmp.train()
                return None
            tpe = out.tokens_per_expert.detach().cpu().long()  # (Λ, E)
            tokens = tpe if tokens is None else tokens + tpe
            tec = out.task_expert_counts.detach().cpu().long()  # (Λ, T+2, E)
            kinds = tec if kinds is None else kinds + tec
            assignments = float(tpe.sum())
            dropped += float(out.dropped_fraction) * assignments
            weight += assignments
    set_collect_stats(restored.dmp, False)
    diagnostics = read_stats(restored.dmp, labels)
    restored.dmp.train()
    if tokens is None or kinds is None:
        return None
    return {
        "split": split,
        "samples": len(loader.dataset),
        "num_moe_layers": int(tokens.shape[0]),
        "num_experts": int(tokens.shape[1]),
        "row_labels": labels,
        "tokens_per_expert": tokens.tolist(),
        "task_expert_counts": kinds.tolist(),
        "dropped_fraction": dropped / max(weight, 1.0),
        "diagnostics": diagnostics,
    }


# ------------------------------------------------------------------------------------------------------ writing


def write_embeddings(reps: UserRepresentations, path: Path) -> None:
    """Write ``reps`` as parquet: ``user_id``, ``user`` and ``task_<name>`` as list<float>, ``source_split``."""

    def as_list(matrix: FloatArray) -> pa.ListArray:
        U, M = matrix.shape
        offsets = pa.array(np.arange(0, (U + 1) * M, M, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1).astype(np.float32)))

    columns: dict[str, Any] = {"user_id": pa.array(reps.user_keys), "user": as_list(reps.user)}
    for name, matrix in reps.tasks.items():
        columns[f"task_{name}"] = as_list(matrix)
    columns["source_split"] = pa.array(reps.source_split.astype(str))
    with atomic_output(path) as part:
        pq.write_table(pa.table(columns), part)


def write_plots(run_dir: Path, routing: dict[str, Any] | None) -> list[Path]:
    """``curves.png`` from ``metrics.json`` (when present) and the routing plots (when ``routing`` is given)."""
    written = []
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        written.append(plots.plot_training_curves(json.loads(metrics_path.read_text()), run_dir / "curves.png"))
    else:
        log.info("%s is absent (run unfinished?): no curves.png", metrics_path)
    if routing is not None:
        written.append(plots.plot_expert_load(routing["tokens_per_expert"], run_dir / "expert_load.png"))
        counts = np.asarray(routing["task_expert_counts"], dtype=np.float64).sum(axis=0)  # (T+2, E) over layers
        title = f"routing share per token kind ({routing['split']}, {routing['num_moe_layers']} MoE layer(s) summed)"
        written.append(
            plots.plot_routing_heatmap(counts, routing["row_labels"], run_dir / "routing_heatmap.png", title)
        )
    return written


# ------------------------------------------------------------------------------------------------------ the job


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The run's resolved ``config.yaml`` with ``--section.key=value`` overrides; checks the arch can export."""
    cfg = load_config(Path(run_dir) / "config.yaml", overrides)
    if cfg.model.arch not in REPRESENTATION_ARCHS:
        raise ConfigError(
            f"model.arch: {cfg.model.arch.value!r} has no user representation to export "
            f"(export needs one of {[a.value for a in REPRESENTATION_ARCHS]})"
        )
    return cfg


def restore_model(run_dir: Path, cfg: ExperimentConfig, data: SplitData | None = None) -> tuple[RestoredModel, str]:
    """A world-of-one model with the run's BEST weights, or LATEST when no epoch finished (no BEST yet).

    Built and sharded as the trainer builds it (:mod:`supermoe_rec.distributed.sharding`), but without optimizers;
    only the weights are read from the checkpoint.

    Returns:
        (the model, which checkpoint was restored: "best" or "latest").
    """
    ctx = init_distributed(cfg.train.device)
    if ctx.world_size != 1:
        raise ConfigError(f"export runs in a single process, but the process group has {ctx.world_size} ranks")
    torch.manual_seed(cfg.train.seed)
    data = data if data is not None else load_run_data(cfg.data, run_dir)  # the run's vocabularies, if any
    module = build_train_module(cfg, data.schema, device=ctx.device, optimizers=False)
    sharded = shard(module, cfg, data.schema, ctx.device)
    loaders = {
        split: ShardedBatchLoader(ds, cfg.train.eval_batch_size, shuffle=False) for split, ds in data.splits.items()
    }
    restored = RestoredModel(cfg, data, sharded.dmp, loaders)
    checkpoints = run_dir / "checkpoints"
    # BEST is written at the end of an improving epoch; a run stopped by max_steps mid-epoch only has LATEST.
    tag = "best" if (checkpoints / "BEST").is_file() else "latest"
    if tag == "latest":
        log.warning("%s has no BEST checkpoint: exporting the LATEST weights", checkpoints)
    CheckpointManager(checkpoints, cfg).restore_weights(TrainState(sharded.dmp, device=ctx.device), tag=tag)
    return restored, tag


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: SplitData | None = None,
    routing: bool = True,
) -> ExportResult:
    """Export user representations, routing statistics and plots of a trained run (see the module docstring).

    Joins (or creates) a world-of-one process group; the caller owns it afterwards.

    Args:
        run_dir: the run directory (holds ``config.yaml``, ``checkpoints/``, ``metrics.json``).
        out: parquet path (default ``<run_dir>/user_embeddings.parquet``).
        overrides: ``--section.key=value`` overrides of the run's config (e.g. ``--train.eval_batch_size=1024``).
        data: the run's data when the caller already loaded it (must match the run's ``data`` config).
        routing: also accumulate routing statistics over the valid split (``routing.json`` and its plots).

    Returns:
        :class:`ExportResult` with the representations and the paths written.
    """
    run_dir = Path(run_dir)
    path = check_output(out, "--out", suffixes=(".parquet",)) if out is not None else run_dir / EMBEDDINGS_FILE
    cfg = load_run_config(run_dir, overrides)
    restored, tag = restore_model(run_dir, cfg, data)
    reps = user_representations(restored)
    write_embeddings(reps, path)
    log.info("wrote %s (%d users, M=%d)", path, len(reps.user_keys), reps.user.shape[1])
    stats = routing_statistics(restored) if routing and "valid" in restored.loaders else None
    files = [path]
    if stats is not None:
        stats["checkpoint"] = tag
        write_json(run_dir / ROUTING_FILE, stats)
        files.append(run_dir / ROUTING_FILE)
    elif routing:
        log.info("no MoE routing statistics (no MoE layer, or no valid split)")
    files += write_plots(run_dir, stats)
    return ExportResult(reps, path, tag, stats, files)


def main(run: str, out: str | None, overrides: Sequence[str]) -> int:
    """CLI body of ``supermoe-rec export``: run the export in a world of one; tear down a group it created."""
    owns_group = not dist.is_initialized()  # an embedding caller's group is left alone
    try:
        result = export_run(run, out, overrides)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    for path in result.files:
        print(path)
    return 0


__all__ = [
    "REPRESENTATION_ARCHS",
    "ExportResult",
    "RestoredModel",
    "UserRepresentations",
    "export_run",
    "latest_rows",
    "load_run_config",
    "restore_model",
    "routing_statistics",
    "user_representations",
    "write_embeddings",
]
