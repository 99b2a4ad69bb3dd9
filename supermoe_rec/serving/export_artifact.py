"""Write a trained run's inference artifact: ``supermoe-rec export --run R --artifact DIR``.

This side runs in the training environment (TorchRec, a world-of-one process group); the artifact it writes is read
by :class:`supermoe_rec.serving.UserEncoder` without either. See :mod:`supermoe_rec.serving.artifact` for the files
and ``docs/serving.md`` for the format choice.

Steps: restore the run's BEST weights (LATEST when no epoch finished) as ``export`` does; gather every embedding
table to a full tensor (sharded tables: ``ShardedTensor.gather`` / ``DTensor.full_tensor``); save the over-arch's
state_dict; build the item catalog (each candidate item's item-side feature ids, from the run's samples); write the
manifest with checksums; then **check**: load the artifact and compare its [USER] vectors and scores with the
training model's (eval, dropless routing) on a sample of users, so an artifact that would serve different numbers
is never left behind silently.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from supermoe_rec.config.experiment import ConfigError, ExperimentConfig
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.output import check_output_dir
from supermoe_rec.data.schema import FeatureSide, Schema
from supermoe_rec.serving import artifact as art
from supermoe_rec.serving.encoder import (
    KNOWN_ITEMS,
    Jagged,
    MappedUsers,
    UserEncoder,
    make_dropless,
    schema_as_dict,
)

if TYPE_CHECKING:
    from supermoe_rec.evaluation.export import RestoredModel

log = logging.getLogger(__name__)

# Tolerance of the export's self-check (the artifact must reproduce the training model's outputs).
CHECK_ATOL = 1e-5
CHECK_USERS = 256


class ExportCheckError(RuntimeError):
    """The written artifact does not reproduce the training model's outputs."""


# --------------------------------------------------------------------------------------------- tables


def _full(value: Any) -> torch.Tensor:
    """A full CPU tensor from a plain tensor, a ShardedTensor (gathered on rank 0) or a DTensor."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu()
    if isinstance(value, ShardedTensor):
        out = torch.empty(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
        value.gather(dst=0, out=out)
        assert out is not None
        return out
    assert isinstance(value, torch.Tensor)
    return value.detach().cpu()


def gather_tables(dmp: torch.nn.Module, schema: Schema) -> dict[str, torch.Tensor]:
    """{table: [rows, D]} full tables of the model's SparseArch, whatever their sharding."""
    state = dmp.state_dict()
    names = {t.name for t in schema.tables}
    pattern = re.compile(
        r"sparse_arch\.(?:ebc|sequence_ebc|sequence_ec)\.(?:embedding_bags|embeddings)\.([^.]+)\.weight$"
    )
    tables: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = pattern.search(key)
        if match and match.group(1) in names:
            tables[match.group(1)] = _full(value)
    missing = sorted(names - set(tables))
    if missing:
        raise RuntimeError(f"no weights found for table(s) {missing} in the model's state_dict")
    return tables


# ---------------------------------------------------------------------------------------------- catalog


def item_catalog(
    datasets: Sequence[TabularDataset], schema: Schema, candidate: str, rows: int
) -> dict[str, torch.Tensor]:
    """Item-side feature ids of every candidate item row, as ``{feature}.values`` / ``{feature}.offsets`` tensors.

    An item's features are read from its first sample (over ``datasets`` in order) where it is the candidate;
    items never seen as a candidate get no ids (their item-side features pool to zeros).
    """
    features = [f.name for f in schema.sparse_features if f.side is FeatureSide.ITEM]
    features += [f.name for f in schema.sequence_features if not f.per_group and f.name != candidate]
    out: dict[str, torch.Tensor] = {}
    known = np.zeros(rows, dtype=bool)
    for ds in datasets:
        target = ds.features[candidate]
        known[target.values[target.offsets[:-1]]] = True
    # Retrieval ranks only items the run has seen as candidates (never padding or out-of-vocabulary rows).
    out[KNOWN_ITEMS] = torch.from_numpy(known)
    for name in features:
        per_item: list[np.ndarray | None] = [None] * rows
        for ds in datasets:
            target, feature = ds.features[candidate], ds.features[name]
            item = target.values[target.offsets[:-1]]  # one candidate per row
            _, first = np.unique(item, return_index=True)
            for r in first:
                i = int(item[r])
                if per_item[i] is None:
                    per_item[i] = feature.values[feature.offsets[r] : feature.offsets[r + 1]]
        lengths = np.array([0 if v is None else len(v) for v in per_item], dtype=np.int64)
        values = [v for v in per_item if v is not None and len(v)]
        out[f"{name}.values"] = torch.from_numpy(
            np.concatenate(values).astype(np.int64) if values else np.zeros(0, np.int64)
        )
        out[f"{name}.offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return out


# ----------------------------------------------------------------------------------------------- source


def checkpoint_step(run_dir: Path, tag: str) -> int | None:
    """The training step of the checkpoint ``tag`` ('best'/'latest') names (from its ``rank0.pt`` state)."""
    pointer = run_dir / "checkpoints" / tag.upper()
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    extras = path / "rank0.pt"
    if extras.is_file():
        state = torch.load(extras, weights_only=True)
        if isinstance(state, dict) and "state" in state:
            step = json.loads(state["state"]).get("step")
            if step is not None:
                return int(step)
    match = re.match(r"ckpt-(\d+)-", path.name)
    return int(match.group(1)) if match else None


def _config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    from supermoe_rec.serving.encoder import _json_ready

    out: dict[str, Any] = _json_ready(cfg)
    return out


# ------------------------------------------------------------------------------------------------ check


def _dataset_users(ds: TabularDataset, rows: np.ndarray, schema: Schema) -> MappedUsers:
    """The users of sample ``rows`` as table rows, straight from the dataset (ids already mapped)."""

    def jagged(name: str) -> Jagged:
        jag = ds.features[name]
        starts, ends = jag.offsets[rows], jag.offsets[rows + 1]
        lengths = (ends - starts).astype(np.int64)
        parts = [jag.values[a:b] for a, b in zip(starts, ends, strict=True)]
        values = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        return Jagged(torch.from_numpy(values), torch.from_numpy(lengths))

    profile = {f.name: jagged(f.name) for f in schema.sparse_features if f.side is FeatureSide.USER}
    history = {f.name: jagged(f.name) for f in schema.sequence_features if f.per_group and f.name != schema.next_items}
    return MappedUsers(len(rows), profile, history, torch.from_numpy(ds.dense[rows]))


def check_artifact(
    encoder: UserEncoder, restored: RestoredModel, users: int = CHECK_USERS, atol: float = CHECK_ATOL
) -> float:
    """Largest |artifact - training model| over [USER] vectors, task representations and scores of ``users``
    training samples (their own candidates); raises :class:`ExportCheckError` above ``atol``.

    The training model runs in eval with dropless routing, as the artifact does.
    """
    from supermoe_rec.evaluation.export import forward_batch

    ds: TabularDataset = restored.data.splits["train"]
    groups = np.linspace(0, ds.num_groups - 1, num=min(users, ds.num_groups)).astype(np.int64)
    groups = np.unique(groups)
    sizes = ds.group_sizes()[groups]
    # Compare only groups of the most common size, so every user has J candidates.
    J = int(np.bincount(sizes).argmax())
    groups = groups[sizes == J]
    batch = ds.batch_of_groups(groups)
    restored.dmp.eval()
    make_dropless(restored.dmp)  # the export process's model only, as the artifact routes
    with torch.no_grad():
        ref = forward_batch(restored, batch).model
    restored.dmp.train()
    rows = ds.group_offsets[groups]  # each group's first row carries the user side
    candidate = encoder.candidate_feature
    cand = None
    if candidate is not None:
        jag = ds.features[candidate.name]
        cand = torch.from_numpy(jag.values[jag.offsets[ds.rows_of_groups(groups)]].reshape(len(groups), J))
    user, tasks, preds = encoder.forward_mapped(_dataset_users(ds, rows, encoder.schema), cand)
    assert ref.user is not None and ref.task_representations is not None
    diffs = [(user - ref.user).abs().max(), (tasks - ref.task_representations).abs().max()]
    if cand is not None:
        diffs += [(preds[n].reshape(-1) - ref.predictions[n]).abs().max() for n in encoder.task_names]
    worst = float(torch.stack(diffs).max())
    if not worst <= atol:
        raise ExportCheckError(
            f"the artifact's outputs differ from the training model's by up to {worst:.3g} (> {atol}) on "
            f"{len(groups)} train users: the serving rebuild of the model does not match (see docs/serving.md)"
        )
    return worst


# ------------------------------------------------------------------------------------------------- main


def check_artifact_target(run_dir: Path, out: Path, overwrite: bool) -> None:
    """``out`` may receive ``run_dir``'s artifact: absent, empty, or an artifact of this same run; another run's
    artifact only with ``overwrite``. Anything else is refused before any work."""
    check_output_dir(out, "--artifact")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / art.MANIFEST).is_file():
        raise art.ArtifactError(f"{out}: exists and is not an artifact; refusing to overwrite it")
    try:
        source = art.read_manifest(out).get("source", {}).get("run")
    except art.ArtifactError:
        source = None
    if source != str(run_dir.resolve()) and not overwrite:
        raise ConfigError(
            f"--artifact: {out} holds the artifact of another run ({source or 'unknown'}); choose another "
            "--artifact, or pass --overwrite to replace it"
        )


def export_artifact(
    run_dir: str | Path, out: str | Path, overrides: Sequence[str] = (), check: bool = True, overwrite: bool = False
) -> Path:
    """Write the inference artifact of ``run_dir`` into ``out``: a new directory, or one that holds an earlier
    artifact of the same run (another run's only with ``overwrite``), which stays until the new one is complete.

    Joins (or creates) a world-of-one process group; the caller owns it afterwards.

    Returns:
        the artifact directory.
    """
    from torchrec.distributed.model_parallel import get_unwrapped_module

    from supermoe_rec.data.vocab import save_vocabularies
    from supermoe_rec.evaluation import export

    run_dir, out = Path(run_dir), Path(out)
    check_artifact_target(run_dir, out, overwrite)
    cfg = export.load_run_config(run_dir, overrides)
    # export's restore: a world of one, the run's BEST (else LATEST) weights, no optimizers
    restored, tag = export.restore_model(run_dir, cfg)
    schema: Schema = restored.data.schema
    root = get_unwrapped_module(restored.dmp)
    model = root.model if hasattr(root, "model") else root
    over_arch = model.over_arch
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [art.TABLES, art.OVER_ARCH, art.ITEM_CATALOG]
    art.save_tensors(gather_tables(restored.dmp, schema), tmp / art.TABLES)
    art.save_tensors(over_arch.state_dict(), tmp / art.OVER_ARCH)
    history = [f for f in schema.sequence_features if f.per_group and f.name != schema.next_items]
    candidate = [f for f in schema.sequence_features if not f.per_group and history and f.table == history[0].table]
    catalog: dict[str, torch.Tensor] = {}
    if candidate:
        rows = schema.table(candidate[0].table).num_embeddings
        catalog = item_catalog(list(restored.data.splits.values()), schema, candidate[0].name, rows)
    art.save_tensors(catalog, tmp / art.ITEM_CATALOG)
    vocabularies = restored.data.vocabularies or {}
    if vocabularies:
        save_vocabularies(vocabularies, tmp / art.VOCAB)
        files.append(art.VOCAB)
    manifest = {
        "source": {
            "run": str(run_dir.resolve()),
            "checkpoint": tag,
            "step": checkpoint_step(run_dir, tag),
            "overrides": list(overrides),
        },
        "config": _config_dict(cfg),
        "schema": {
            "schema": schema_as_dict(schema),
            "max_history": cfg.data.max_history,
            "tasks": [{"name": t.name, "type": t.type.value} for t in schema.task_specs()],
            "features": {
                "profile": [f.name for f in schema.sparse_features if f.side is FeatureSide.USER],
                "item": [f.name for f in schema.sparse_features if f.side is FeatureSide.ITEM],
                "history": [f.name for f in history],
                "candidate": candidate[0].name if candidate else None,
                "dense": [d.name for d in schema.dense_features],
                "next_items": schema.next_items,
            },
            "tables": {
                t.name: {
                    "rows": t.num_embeddings,
                    "dim": int(schema.table(t.name).embedding_dim or cfg.model.embedding_dim),
                    "ids": "vocab" if t.name in vocabularies else ("hash" if t.hash else "integer"),
                }
                for t in schema.tables
            },
        },
        "model": {
            "table_free_part": "state_dict",
            "module": "supermoe_rec.models.supermoe.SuperMoEOverArch",
            "why_not_pt2": (
                "torch.export cannot trace the MoE encoder: its token count, routing capacity and group count are "
                "data-dependent (nonzero, int() of tensors, Python branches on them); see docs/serving.md"
            ),
            "routing": "dropless",
            "user_vector": "ModelOutput.user (the encoder's [USER] output)",
            "retrieval": "score_items"
            if over_arch.item_table_dim
            else ("item_proj" if over_arch.item_proj is not None else "table"),
        },
    }
    art.write_manifest(tmp, manifest, files)
    if check:
        encoder = UserEncoder.load(tmp)
        worst = check_artifact(encoder, restored)
        log.info("artifact check: max |artifact - training model| = %.3g over [USER], task reps and scores", worst)
    old = out.with_name(f".{out.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)  # the earlier artifact stays whole until the new one is in place
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("wrote artifact %s (%d files, %.1f MiB)", out, len(files) + 1, art.artifact_bytes(out) / 2**20)
    return out


def main(run: str, artifact_dir: str, overrides: Sequence[str], overwrite: bool = False) -> int:
    """CLI body of ``supermoe-rec export --artifact``: a world of one; tear down a group it created."""
    owns_group = not dist.is_initialized()
    try:
        path = export_artifact(run, artifact_dir, overrides, overwrite=overwrite)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    print(path)
    return 0


__all__ = [
    "ExportCheckError",
    "check_artifact",
    "check_artifact_target",
    "export_artifact",
    "gather_tables",
    "item_catalog",
    "main",
]
