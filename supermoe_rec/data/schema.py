"""The schema of an interaction table: which columns are features, sequences, dense values, labels and masks.

A schema turns any interaction table (pandas DataFrame, parquet or CSV) into samples and TorchRec batches; the
MovieLens protocol builds one in code, users write one in YAML (see ``configs/schema_example.yaml``)::

    user_column: user_id          # identifies the user (per-user metrics, probes)
    group_column: request_id      # optional: rows of a group share user-side work (one encoder pass)
    tables:
      - {name: user, num_embeddings: 100000}
      - {name: item, num_embeddings: 1000000, hash: true}   # ids hashed into range instead of rejected
      - {name: country, vocab: true}              # strings: ids from the train file's values, row 0 = unknown
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
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from supermoe_rec.config.base import ConfigError, from_dict, read_utf8
from supermoe_rec.config.tasks import TaskSpec, TaskType

if TYPE_CHECKING:
    from supermoe_rec.config.experiment import ExperimentConfig

log = logging.getLogger(__name__)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parser error as one line: the problem and where (1-based line and column).

    Example::

        >>> try:
        ...     yaml.safe_load("a: [1, 2")
        ... except yaml.YAMLError as exc:
        ...     print(yaml_problem(exc))
        expected ',' or ']', but got '<stream end>' (line 1, column 9)
    """
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


@dataclass(frozen=True)
class VocabSpec:
    """A vocabulary's options: values seen fewer than ``min_count`` times in the train file map to row 0 (OOV)."""

    min_count: int = 1


@dataclass(frozen=True)
class TableSpec:
    """An embedding table: its row count, and whether out-of-range ids are hashed into range (else an error).

    ``vocab: true`` (or ``vocab: {min_count: N}``): the column's values (strings, years, sparse ids) are mapped
    through a vocabulary built from the train file (:mod:`supermoe_rec.data.vocab`); row 0 is the out-of-vocabulary
    and padding row, and ``num_embeddings`` is derived (do not write it).
    """

    name: str
    # 0 only for a vocab table before its vocabulary is built; every other table needs its row count.
    num_embeddings: int = 0
    hash: bool = False
    # Optional per-table width; the model's embedding_dim applies when unset.
    embedding_dim: int | None = None
    vocab: bool | VocabSpec = False

    @property
    def vocab_spec(self) -> VocabSpec | None:
        """The vocabulary options, or None for a table that reads integer ids."""
        if isinstance(self.vocab, VocabSpec):
            return self.vocab
        return VocabSpec() if self.vocab else None


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


# The key under which a batch carries the next-items candidates (the catalogue, or sampled ids), spread over its
# rows; it reads the table of the schema's ``next_items`` feature.
ITEM_CANDIDATES = "item_candidates"


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
    # The per-group sequence feature that holds each sample's *future* items (the positives of the next-items
    # objective, supermoe_rec/objectives/next_items.py). It is a label, not an input: the encoder never reads it.
    next_items: str | None = None
    name: str = "table"
    _source: str = field(default="schema", compare=False, repr=False)

    @staticmethod
    def from_dict(values: Mapping[str, Any], source: str = "schema") -> Schema:
        try:
            schema = from_dict({**values, "_source": source}, Schema)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        for t in schema.tables:
            if t.vocab_spec is not None and t.num_embeddings:
                raise ConfigError(
                    f"{source}: tables.{t.name}.num_embeddings: derived from the vocabulary (vocab is set); remove it"
                )
        schema.validate()
        return schema

    @staticmethod
    def from_yaml(path: str | Path) -> Schema:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: schema file not found")
        text = read_utf8(path)
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
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
            vocab = t.vocab_spec
            if vocab is None and t.num_embeddings <= 0:
                raise ConfigError(
                    f"{src}: tables.{t.name}.num_embeddings must be positive (or set vocab: true to derive it from "
                    "the train file's values)"
                )
            if vocab is not None and t.hash:
                raise ConfigError(f"{src}: tables.{t.name}.hash: a vocab table maps unknown values to row 0; drop hash")
            if vocab is not None and vocab.min_count < 1:
                raise ConfigError(f"{src}: tables.{t.name}.vocab.min_count must be at least 1")
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
                    "pooled one a sequence feature of length 1 (as target_item is; docs/data.md#the-schema)"
                )
        for f in self.sparse_features:
            if f.per_group:
                raise ConfigError(f"{src}: sparse_features.{f.name}.per_group applies to sequence features only")
        for f in self.sequence_features:
            if f.per_group and self.group_column is None:
                raise ConfigError(
                    f"{src}: sequence_features.{f.name}.per_group needs group_column: without it every row is its "
                    "own group and the encoder runs once per row (name the column of rows that share this value, "
                    "e.g. a request id)"
                )
            others = [g.name for g in self.sequence_features if g.table == f.table and g.name != f.name]
            if f.multi_valued and not f.per_group and others:
                raise ConfigError(
                    f"{src}: sequence_features.{f.name}.per_group: a list of ids that shares table {f.table!r} with "
                    f"{others} is a history; without per_group: true it is pooled into the candidate and the "
                    "encoder sees no history. Set per_group: true (and group_column), or give a per-row list its "
                    "own table in sparse_features"
                )
        if self.next_items is not None:
            spec = next((f for f in self.sequence_features if f.name == self.next_items), None)
            if spec is None or not spec.per_group:
                raise ConfigError(f"{src}: next_items: {self.next_items!r} must name a per_group sequence feature")
        if not self.tasks:
            raise ConfigError(f"{src}: tasks: at least one task is needed")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise ConfigError(f"{src}: tasks: duplicate task names")

    def next_items_table(self) -> TableSpec | None:
        """The item table that the next-items objective scores against (that of ``next_items``), if any."""
        if self.next_items is None:
            return None
        spec = next(f for f in self.sequence_features if f.name == self.next_items)
        return self.table(spec.table)

    def vocab_tables(self) -> list[TableSpec]:
        """The tables whose ids come from a vocabulary."""
        return [t for t in self.tables if t.vocab_spec is not None]

    def features_of_table(self, table: str) -> list[FeatureSpec]:
        return [f for f in (*self.sparse_features, *self.sequence_features) if f.table == table]

    def with_table_sizes(self, sizes: Mapping[str, int]) -> Schema:
        """The same schema with ``num_embeddings`` set for the named tables (vocabulary sizes, row 0 included)."""
        tables = tuple(
            dataclasses.replace(t, num_embeddings=int(sizes[t.name])) if t.name in sizes else t for t in self.tables
        )
        out = dataclasses.replace(self, tables=tables)
        out.validate()
        return out

    def task_specs(self) -> list[TaskSpec]:
        return [TaskSpec(t.name, t.type) for t in self.tasks]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def check_task_names(self, tasks: Sequence[str], task_weights: Mapping[str, float]) -> None:
        """``data.tasks`` and ``train.loss.task_weights`` may name only this schema's tasks (checked at config load)."""
        known = [t.name for t in self.tasks]
        for key, names in (("data.tasks", list(tasks)), ("train.loss.task_weights", list(task_weights))):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ConfigError(f"{key}: unknown task(s) {unknown} (the schema {self._source} has {known})")

    def select_tasks(self, names: Sequence[str]) -> Schema:
        """The same schema restricted to ``names`` (in that order); an unknown task name is an error naming it."""
        if not names:
            return self
        known = {t.name: t for t in self.tasks}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"data.tasks: unknown task(s) {unknown} (known: {list(known)})")
        return dataclasses.replace(self, tasks=tuple(known[n] for n in names))


# DataConfig keys that only the ml-mt protocol (and the synthetic stream) read: ignored with data.source: table.
ML_MT_ONLY_KEYS = (
    "seed",
    "valid_fraction",
    "test_fraction",
    "leave_one_out",
    "cache_dir",
    "try_url",
    "url_timeout_s",
    "sequences_dir",
)


def check_table_config(cfg: ExperimentConfig) -> list[str]:
    """Load-time checks of a ``data.source: table`` config, before any data is read (docs/data.md).

    ``data.tasks`` and ``train.loss.task_weights`` must name tasks of the schema (when its file exists; a missing
    file is reported when the data loads). ml-mt-only and synthetic keys set to non-default values do nothing with
    a table: each is named in a warning, which is also returned.
    """
    data = cfg.data
    if data.source != "table":
        return []
    defaults = type(data)()
    ignored = [
        f"data.{f.name}"
        for f in dataclasses.fields(data)
        if (f.name in ML_MT_ONLY_KEYS or f.name.startswith(("synthetic_", "next_")))
        and getattr(data, f.name) != getattr(defaults, f.name)
    ]
    warnings = []
    if ignored:
        warnings.append(
            f"data.source is 'table': {', '.join(ignored)} apply to the ml-mt protocol or the synthetic stream only "
            "and are ignored (configs/byo.yaml has none of them)"
        )
        log.warning("%s", warnings[-1])
    if data.schema is not None and Path(data.schema).is_file():
        Schema.from_yaml(data.schema).check_task_names(data.tasks, cfg.train.loss.task_weights)
    return warnings
