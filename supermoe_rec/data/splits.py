"""One entry point from a :class:`DataConfig` to validated train/valid/test samples and a printable summary.

``source``: ``ml100k`` / ``ml1m`` build the ml-mt protocol over MovieLens; ``table`` reads a user's interaction
table(s) with a schema YAML. (``synthetic`` data is a stream, see :mod:`supermoe_rec.data.synthetic`.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from supermoe_rec.config.experiment import ConfigError, DataConfig, TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.features import read_table
from supermoe_rec.data.generative import UserSequences
from supermoe_rec.data.jagged import IntArray
from supermoe_rec.data.movielens import MovieLens, fetch_movielens
from supermoe_rec.data.protocol import SPLITS, build_ml_mt
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.sequences import SEQUENCE_FILES, build_sequences, read_sequences, sequence_file
from supermoe_rec.data.vocab import FILE_NAME as VOCAB_FILE
from supermoe_rec.data.vocab import Vocabulary, load_vocabularies

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """Validated samples per split (valid/test may be absent for a table without them) and their schema."""

    schema: Schema
    splits: dict[str, TabularDataset]
    info: dict[str, Any]
    # Extra per-split counts from the source (e.g. the protocol's positives and negatives).
    split_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per vocab table, the vocabulary built from the train split (saved with the run as vocab.json).
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    # Sources that know every user's whole sequence (MovieLens protocols, item-sequence files) give it here, with
    # each split's target positions per stored row: what the generative layout needs
    # (:func:`supermoe_rec.data.generative.to_generative`). None for tables.
    sequences: UserSequences | None = None
    positions: dict[str, IntArray] = field(default_factory=dict)

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.schema.task_specs()

    def summary(self) -> dict[str, Any]:
        """Counts per split and task: rows, samples, groups, users, labelled samples, label means, and the positives
        and negatives of every binary task."""
        out: dict[str, Any] = dict(self.info)
        out["tasks"] = {t.name: t.type.value for t in self.tasks}
        out["splits"] = {}
        for name, ds in self.splits.items():
            split: dict[str, Any] = {
                "rows": ds.report.rows_read,
                "samples": len(ds),
                "groups": ds.num_groups,
                "users": len(np.unique(ds.user_keys)),
            }
            split.update(self.split_info.get(name, {}))
            labelled = ds.task_mask.sum(axis=0)
            split["binary_labels"] = {
                t.name: {
                    "positives": int(((ds.labels[:, j] == 1) & (ds.task_mask[:, j] == 1)).sum()),
                    "negatives": int(((ds.labels[:, j] == 0) & (ds.task_mask[:, j] == 1)).sum()),
                }
                for j, t in enumerate(self.tasks)
                if t.type is TaskType.BINARY
            }
            split["labelled"] = {t.name: int(labelled[j]) for j, t in enumerate(self.tasks)}
            split["label_mean"] = {
                t.name: round(float((ds.labels[:, j] * ds.task_mask[:, j]).sum() / max(1.0, labelled[j])), 4)
                for j, t in enumerate(self.tasks)
            }
            split["report"] = ds.report.as_dict()
            out["splits"][name] = split
        return out


def load_data(cfg: DataConfig, vocabularies: Mapping[str, Vocabulary] | None = None) -> SplitData:
    """Build every split described by ``cfg`` (MovieLens protocol or a user's table + schema).

    ``vocabularies``: a run's saved ones (``vocab.json``), used instead of building them from the train table, so a
    trained model reads its data with the mapping it was trained with.
    """
    if cfg.source in ("ml100k", "ml1m"):
        ml = fetch_movielens(cfg.source, cfg.cache_dir, cfg.try_url, cfg.url_timeout_s)
        return from_movielens(ml, cfg)
    if cfg.source == "table":
        return from_tables(cfg, vocabularies)
    if cfg.source in SEQUENCE_FILES or cfg.source == "sequences":
        return from_sequences(cfg)
    known = ", ".join(["ml100k", "ml1m", "table", *SEQUENCE_FILES, "sequences"])
    raise ConfigError(f"data.source: {cfg.source!r} has no train/valid/test splits (known: {known})")


def load_run_data(cfg: DataConfig, run_dir: str | Path) -> SplitData:
    """The data of a trained run: its saved vocabularies (``<run_dir>/vocab.json``, when it has vocab tables) map
    the ids as in training, whatever the train file holds now (export, resume, serving)."""
    vocab_file = Path(run_dir) / VOCAB_FILE
    return load_data(cfg, load_vocabularies(vocab_file) if vocab_file.is_file() else None)


def drop_features(schema: Schema, names: Sequence[str]) -> Schema:
    """``schema`` without the named pooled/sequence features and the tables only they used (``data.drop_features``).

    The input columns stay in the table; no sample reads them. An unknown name is a :class:`ConfigError`.
    """
    if not names:
        return schema
    known = [f.name for f in (*schema.sparse_features, *schema.sequence_features)]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"data.drop_features: unknown feature(s) {unknown} (known: {known})")
    sparse = tuple(f for f in schema.sparse_features if f.name not in names)
    sequence = tuple(f for f in schema.sequence_features if f.name not in names)
    used = {f.table for f in (*sparse, *sequence)}
    out = dataclasses.replace(
        schema,
        sparse_features=sparse,
        sequence_features=sequence,
        tables=tuple(t for t in schema.tables if t.name in used),
    )
    try:
        out.validate()  # e.g. dropping every feature leaves nothing to embed
    except ConfigError as exc:
        raise ConfigError(f"data.drop_features: {exc}") from exc
    return out


def from_sequences(cfg: DataConfig) -> SplitData:
    """Leave-one-out next-item samples from an item-sequence file (:mod:`supermoe_rec.data.sequences`)."""
    path = sequence_file(cfg)
    users, seqs = read_sequences(path)
    name = cfg.source if cfg.source != "sequences" else path.stem
    out = build_sequences(users, seqs, cfg, name)
    schema = drop_features(out["schema"].select_tasks(cfg.tasks), cfg.drop_features)  # type: ignore[attr-defined]
    frames: dict[str, pd.DataFrame] = out["frames"]  # type: ignore[assignment]
    splits = {
        split: TabularDataset(frame, schema, f"{path}/{split}", cfg.max_history)
        for split, frame in tqdm(frames.items(), desc="validating splits", leave=False, disable=None)
    }
    info: dict[str, Any] = {
        "dataset": name,
        "source": str(path),
        "users": len(users),
        "items": out["num_items"],
        "interactions": int(sum(len(s) for s in seqs)),
    }
    return SplitData(
        schema=schema,
        splits=splits,
        info=info,
        split_info=out["split_counts"],  # type: ignore[arg-type]
        sequences=out["sequences"],  # type: ignore[arg-type]
        positions={s: frames[s]["position"].to_numpy(np.int64)[ds.input_row] for s, ds in splits.items()},
    )


def from_movielens(ml: MovieLens, cfg: DataConfig) -> SplitData:
    out = build_ml_mt(ml, cfg)
    schema = drop_features(out.schema.select_tasks(cfg.tasks), cfg.drop_features)
    splits = {
        name: TabularDataset(frame, schema, f"{ml.name}-mt/{name}", cfg.max_history)
        for name, frame in tqdm(out.frames.items(), desc="validating splits", leave=False, disable=None)
    }
    for name, ds in splits.items():  # the protocol's windows did the truncating: the report counts them
        ds.report.histories_truncated = out.split_counts[name]["histories_truncated"]
    info: dict[str, Any] = {"dataset": f"{ml.name}-mt", "source": ml.source, **ml.summary()}
    info["negatives_seed"] = cfg.seed
    info["max_history"] = cfg.max_history
    return SplitData(
        schema=schema,
        splits=splits,
        info=info,
        split_info=out.split_counts,
        sequences=out.sequences,
        positions={s: out.frames[s]["position"].to_numpy(np.int64)[ds.input_row] for s, ds in splits.items()},
    )


def from_tables(cfg: DataConfig, vocabularies: Mapping[str, Vocabulary] | None = None) -> SplitData:
    if cfg.schema is None or cfg.table is None:
        raise ConfigError("data.schema and data.table are required when data.source is 'table'")
    schema = drop_features(Schema.from_yaml(cfg.schema).select_tasks(cfg.tasks), cfg.drop_features)
    frames: dict[str, tuple[pd.DataFrame, str]] = {"train": (read_table(cfg.table), cfg.table)}
    for name, path in (("valid", cfg.valid_table), ("test", cfg.test_table)):
        if path is not None:
            frames[name] = (read_table(path), path)
    # The train split builds the vocabularies (unless a run's are given); valid and test map through them.
    train_frame, train_source = frames.pop("train")
    train = TabularDataset(train_frame, schema, train_source, cfg.max_history, vocabularies)
    splits = {"train": train}
    for name, (frame, source) in frames.items():
        splits[name] = TabularDataset(frame, train.schema, source, cfg.max_history, train.vocabularies)
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        log.warning("no %s table given: those splits are skipped", " / ".join(missing))
    info: dict[str, Any] = {
        "dataset": schema.name,
        "source": cfg.table,
        "rows": sum(d.report.rows_read for d in splits.values()),
    }
    if train.vocabularies:
        info["vocabularies"] = {name: v.num_embeddings for name, v in train.vocabularies.items()}
    return SplitData(schema=train.schema, splits=splits, info=info, vocabularies=dict(train.vocabularies))


__all__ = ["DataError", "SplitData", "drop_features", "from_movielens", "from_tables", "load_data", "load_run_data"]
