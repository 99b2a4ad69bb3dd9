"""The schema of an interaction table: which columns are features, sequences, dense values, labels and masks.

A schema turns any interaction table (pandas DataFrame, parquet or CSV) into samples and TorchRec batches; the
MovieLens protocol builds one in code, users write one in YAML (see ``configs/schema_example.yaml``)::

    user_column: user_id          # identifies the user (per-user metrics, probes)
    group_column: request_id      # optional: rows of a group share user-side work (one encoder pass)
    tables:
      - {name: user, num_embeddings: 100000}
      - {name: item, num_embeddings: 1000000, hash: true}   # ids hashed into range instead of rejected
    sparse_features:              # pooled by an EmbeddingBagCollection
      - {name: user_id, column: user_id, table: user, side: user}
      - {name: tags, column: tags, table: tag, multi_valued: true}   # a list, or a "a b c" string
    sequence_features:            # unpooled (EmbeddingCollection); may share a table with others
      - {name: history, column: history, table: item, per_group: true}
      - {name: target_item, column: item_id, table: item}
    dense_features:
      - {name: price, column: price}
    tasks:
      - {name: click, type: binary, label: clicked}            # no mask: labelled where the label is present
      - {name: rating, type: regression, label: stars, mask: has_stars}

Example::

    >>> schema = Schema.from_dict({
    ...     "user_column": "u",
    ...     "tables": [{"name": "item", "num_embeddings": 10}],
    ...     "sparse_features": [{"name": "item_id", "column": "i", "table": "item"}],
    ...     "tasks": [{"name": "click", "type": "binary", "label": "y"}],
    ... }, source="inline")
    >>> [t.name for t in schema.task_specs()]
    ['click']
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from supermoe_rec.config import ConfigError, TaskType, from_dict
from supermoe_rec.tasks import TaskSpec


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: its row count, and whether out-of-range ids are hashed into range (else an error)."""

    name: str
    num_embeddings: int
    hash: bool = False
    # Optional per-table width; the model's embedding_dim applies when unset.
    embedding_dim: int | None = None


class FeatureSide(str, enum.Enum):
    """Whose attribute a pooled feature is: the user's (profile) or the candidate item's."""

    USER = "user"
    ITEM = "item"


@dataclass(frozen=True)
class FeatureSpec:
    """A categorical feature: the column it reads and the table it looks up.

    ``multi_valued``: the column holds a list of ids per row (or a string of ids joined by ``separator``).
    ``per_group`` (sequence features): the value is the same for every row of a group, so a batch carries it once
    per group (on the group's first row) and the encoder runs once per group.
    ``side`` (pooled features): ``user`` features describe the user (they condition the encoder's [USER] and task
    tokens and feed the towers as the profile), ``item`` features describe the candidate.
    """

    name: str
    column: str
    table: str
    multi_valued: bool = False
    per_group: bool = False
    separator: str = " "
    side: FeatureSide = FeatureSide.ITEM


@dataclass(frozen=True)
class DenseSpec:
    name: str
    column: str


@dataclass(frozen=True)
class TaskColumns:
    """A task: its label column, its type, and its mask column (absent: labelled wherever the label is present)."""

    name: str
    type: TaskType
    label: str
    mask: str | None = None


@dataclass(frozen=True)
class Schema:
    user_column: str
    tables: tuple[TableSpec, ...]
    tasks: tuple[TaskColumns, ...]
    sparse_features: tuple[FeatureSpec, ...] = ()
    sequence_features: tuple[FeatureSpec, ...] = ()
    dense_features: tuple[DenseSpec, ...] = ()
    group_column: str | None = None
    timestamp_column: str | None = None
    # Drop rows where no task is labelled (they carry no loss). They are counted and reported, never silent.
    drop_unlabelled: bool = True
    name: str = "table"
    _source: str = field(default="schema", compare=False, repr=False)

    @staticmethod
    def from_dict(values: Mapping[str, Any], source: str = "schema") -> Schema:
        try:
            schema = from_dict({**values, "_source": source}, Schema)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        schema.validate()
        return schema

    @staticmethod
    def from_yaml(path: str | Path) -> Schema:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: schema file not found")
        with path.open() as f:
            values = yaml.safe_load(f)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{path}: a schema is a mapping (user_column, tables, features, tasks)")
        return Schema.from_dict(values, source=str(path))

    def validate(self) -> None:
        """Cross-field checks: unique names, known tables, at least one task and one feature."""
        src = self._source
        tables = {t.name for t in self.tables}
        if len(tables) != len(self.tables):
            raise ConfigError(f"{src}: tables: duplicate table names")
        for t in self.tables:
            if t.num_embeddings <= 0:
                raise ConfigError(f"{src}: tables.{t.name}.num_embeddings must be positive")
        features = [*self.sparse_features, *self.sequence_features]
        if not features:
            raise ConfigError(f"{src}: sparse_features/sequence_features: at least one categorical feature is needed")
        names = [f.name for f in features] + [d.name for d in self.dense_features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{src}: duplicate feature names {dupes}")
        for kind, group in (("sparse_features", self.sparse_features), ("sequence_features", self.sequence_features)):
            for f in group:
                if f.table not in tables:
                    raise ConfigError(
                        f"{src}: {kind}.{f.name}.table: unknown table {f.table!r} (known: {sorted(tables)})"
                    )
        pooled_tables = {f.table for f in self.sparse_features}
        for f in self.sequence_features:
            if f.table in pooled_tables:
                raise ConfigError(
                    f"{src}: sequence_features.{f.name}.table: table {f.table!r} is also used by a pooled feature; "
                    "an EmbeddingBagCollection table cannot be shared with an EmbeddingCollection, so make the "
                    "pooled one a sequence feature of length 1 (as target_item is)"
                )
        for f in self.sparse_features:
            if f.per_group:
                raise ConfigError(f"{src}: sparse_features.{f.name}.per_group applies to sequence features only")
        if not self.tasks:
            raise ConfigError(f"{src}: tasks: at least one task is needed")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise ConfigError(f"{src}: tasks: duplicate task names")

    def task_specs(self) -> list[TaskSpec]:
        return [TaskSpec(t.name, t.type) for t in self.tasks]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def select_tasks(self, names: Sequence[str]) -> Schema:
        """The same schema restricted to ``names`` (in that order); an unknown task name is an error naming it."""
        if not names:
            return self
        known = {t.name: t for t in self.tasks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"data.tasks: unknown task(s) {unknown} (known: {list(known)})")
        return dataclasses.replace(self, tasks=tuple(known[n] for n in names))
