"""Validated, columnar samples built from an interaction table and a :class:`Schema`, and batch assembly.

:class:`TabularDataset` checks every column once, up front, and stores each categorical feature as a jagged
(values, offsets) pair, so making a batch is a handful of vectorised gathers. Bad input is a :class:`DataError`
naming the table, the row and the column. Rows are reordered so that the rows of a group are contiguous.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from supermoe_rec.config.experiment import TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.errors import DataError, first_true
from supermoe_rec.data.features import feature_values, table_ids
from supermoe_rec.data.jagged import IntArray, concat_ranges, offsets_from_lengths, take_rows
from supermoe_rec.data.lists import plain
from supermoe_rec.data.schema import ITEM_CANDIDATES, FeatureSpec, Schema
from supermoe_rec.data.vocab import Vocabulary

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass
class Jagged:
    values: IntArray
    offsets: IntArray


@dataclass
class DatasetReport:
    """What loading did to the input: nothing is dropped or changed without being counted here."""

    source: str
    rows_read: int
    rows_dropped_unlabelled: int = 0
    hashed_ids: dict[str, int] = field(default_factory=dict)
    # Rows whose per-group history is longer than data.max_history: the encoder keeps its most recent items.
    histories_truncated: int = 0
    # Rows equal to an earlier row in every column the schema reads; counted, kept (the schema does not drop them).
    duplicate_rows: int = 0
    # Per feature of a vocab table: values mapped to row 0 (not in the train file's vocabulary, rare or missing).
    vocab_oov: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_dropped_unlabelled": self.rows_dropped_unlabelled,
            "hashed_ids": dict(self.hashed_ids),
            "histories_truncated": self.histories_truncated,
            "duplicate_rows": self.duplicate_rows,
            "vocab_oov": dict(self.vocab_oov),
        }


def spread_candidates(candidates: IntArray | None, rows: int) -> KeyedJaggedTensor:
    """The ``item_candidates`` key of a batch of ``rows`` rows: the ids in order, ``ceil(N / rows)`` per row.

    Spreading keeps the padded width small (a bags-of-one lookup pads every key to its widest row).

    Example::

        >>> spread_candidates(np.arange(1, 6), 2).lengths().tolist()
        [3, 2]
    """
    ids = np.zeros(0, dtype=np.int64) if candidates is None else np.asarray(candidates, dtype=np.int64)
    chunk = -(-len(ids) // max(rows, 1))
    lengths = np.clip(len(ids) - chunk * np.arange(rows), 0, chunk).astype(np.int32)
    if rows == 0 and len(ids):
        raise ValueError("candidates need at least one row to ride on")
    return KeyedJaggedTensor(
        keys=[ITEM_CANDIDATES], values=torch.from_numpy(ids), lengths=torch.from_numpy(lengths), stride=rows
    )


def _jagged_row_hash(jag: Jagged) -> npt.NDArray[np.uint64]:
    """A 64-bit hash per row of a jagged feature, from its ids, their positions and the row's length."""
    lengths = np.diff(jag.offsets)
    position = np.arange(len(jag.values), dtype=np.int64) - np.repeat(jag.offsets[:-1], lengths)
    value_hash = pd.util.hash_array(jag.values.astype(np.int64) * 1_000_003 + position)
    cumulative = np.zeros(len(value_hash) + 1, dtype=np.uint64)
    np.cumsum(value_hash, dtype=np.uint64, out=cumulative[1:])  # wraps modulo 2^64, as the differences do
    sums = cumulative[jag.offsets[1:]] - cumulative[jag.offsets[:-1]]
    return pd.util.hash_array(sums ^ lengths.astype(np.uint64))


class TabularDataset:
    """Samples of one split: validated jagged features, dense features, labels [N, T] and task masks [N, T].

    Args:
        frame: the interaction table, one row per sample (candidate).
        schema: which columns are what.
        source: the file or table name used in error messages.
        max_history: the encoder's history length (``data.max_history``); longer per-group histories are counted
            in the report as truncated (the model keeps their most recent items).
        vocabularies: per ``vocab`` table, the vocabulary built from the train split. A vocab table without one
            gets it built from ``frame`` (so pass the train split's to valid and test); ``self.schema`` then has
            the derived ``num_embeddings`` and ``self.vocabularies`` holds every vocab table's vocabulary.

    Example::

        >>> schema = Schema.from_dict({
        ...     "user_column": "u", "tables": [{"name": "item", "num_embeddings": 10}],
        ...     "sequence_features": [{"name": "target", "column": "i", "table": "item"}],
        ...     "tasks": [{"name": "click", "type": "binary", "label": "y"}]})
        >>> ds = TabularDataset(pd.DataFrame({"u": [1, 1, 2], "i": [3, 4, 5], "y": [1, 0, 1]}), schema, "demo")
        >>> len(ds), ds.num_groups
        (3, 3)
        >>> ds.batch(np.array([0, 2])).labels.tolist()
        [[1.0], [1.0]]
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        schema: Schema,
        source: str,
        max_history: int | None = None,
        vocabularies: Mapping[str, Vocabulary] | None = None,
    ) -> None:
        self.schema = schema
        self.source = source
        self.tasks: list[TaskSpec] = schema.task_specs()
        self.report = DatasetReport(source=source, rows_read=len(frame))
        if frame.empty:
            raise DataError(source, "no rows (empty table)")
        frame = frame.reset_index(drop=True)
        self._check_columns(frame)

        # Validate and convert every column in input order, so errors name rows as the user sees them.
        labels, mask = self._labels(frame)
        specs = (*schema.sparse_features, *schema.sequence_features)
        flat = {spec.name: self._flatten(frame[spec.column], spec) for spec in specs}
        self.vocabularies = self._vocabularies(flat, vocabularies or {})
        if self.vocabularies:
            schema = self.schema = schema.with_table_sizes({n: v.num_embeddings for n, v in self.vocabularies.items()})
        features = {spec.name: self._categorical(spec, *flat[spec.name]) for spec in specs}
        dense = self._dense(frame)
        timestamps = self._timestamps(frame)
        group_keys = self._group_keys(frame)
        self.report.duplicate_rows = self._count_duplicates(frame, features)
        if self.report.duplicate_rows:
            log.warning("%s: %d row(s) duplicate an earlier row (kept)", source, self.report.duplicate_rows)

        keep = mask.any(axis=1) if schema.drop_unlabelled else np.ones(len(frame), dtype=bool)
        if not keep.all():
            self.report.rows_dropped_unlabelled = int((~keep).sum())
            log.warning("%s: dropped %d row(s) with no labelled task", source, self.report.rows_dropped_unlabelled)
            if not keep.any():
                raise DataError(source, "no row carries a label for any task")
        # Rows of a group become contiguous (stable: input order is kept within and across groups).
        order = np.flatnonzero(keep)
        if schema.group_column is not None:
            group_codes = pd.factorize(group_keys[order], sort=False)[0]
            by_group = np.argsort(group_codes, kind="stable")
            order, sizes = order[by_group], np.bincount(group_codes)
        else:
            sizes = np.ones(len(order), dtype=np.int64)
        self.input_row: IntArray = order  # input row of each stored row, for error messages
        # The generative layout (supermoe_rec.data.generative.regroup) sets these: the token each row is scored
        # from [N], and the first next-items target token of each group [G]. None: the per-group layout.
        self.position_index: IntArray | None = None
        self.target_start: IntArray | None = None
        self.group_lengths: IntArray | None = None  # items of each group's chunk
        self.group_offsets: IntArray = offsets_from_lengths(sizes.astype(np.int64))

        self.labels: FloatArray = labels[order]
        self.task_mask: FloatArray = mask[order]
        self.dense: FloatArray = dense[order]
        users = frame[schema.user_column].to_numpy()[order]
        self.user_keys = users
        self.user_index: IntArray = pd.factorize(users, sort=True)[0].astype(np.int64)
        self.timestamps: IntArray | None = timestamps[order] if timestamps is not None else None
        self.features: dict[str, Jagged] = {}
        for name, jag in features.items():
            values, lengths = take_rows(jag.values, jag.offsets, order)
            self.features[name] = Jagged(values, offsets_from_lengths(lengths))
        for spec in schema.sequence_features:
            if spec.per_group:
                self._check_per_group(spec)
        if max_history is not None:
            self.report.histories_truncated = self._count_truncated(max_history)
            if self.report.histories_truncated:
                log.info(
                    "%s: %d row(s) have a history longer than data.max_history=%d (the most recent items are kept)",
                    source,
                    self.report.histories_truncated,
                    max_history,
                )

    # ------------------------------------------------------------------------------------------- validation

    def _check_columns(self, frame: pd.DataFrame) -> None:
        s = self.schema
        needed = [s.user_column, *(f.column for f in (*s.sparse_features, *s.sequence_features))]
        needed += [d.column for d in s.dense_features]
        needed += [t.label for t in s.tasks] + [t.mask for t in s.tasks if t.mask]
        needed += [c for c in (s.group_column, s.timestamp_column) if c]
        for column in dict.fromkeys(needed):
            if column not in frame.columns:
                raise DataError(self.source, f"missing column (columns are {list(frame.columns)})", column=column)

    def _labels(self, frame: pd.DataFrame) -> tuple[FloatArray, FloatArray]:
        n, t = len(frame), len(self.schema.tasks)
        labels = np.zeros((n, t), dtype=np.float32)
        mask = np.zeros((n, t), dtype=np.float32)
        for j, task in enumerate(self.schema.tasks):
            raw = frame[task.label]
            values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
            not_numeric = np.isnan(values) & raw.notna().to_numpy()
            if not_numeric.any():
                row = first_true(not_numeric)
                raise DataError(
                    self.source, f"label is not a number: {plain(raw.iloc[row])!r}", row=row, column=task.label
                )
            if task.mask is None:
                present = ~np.isnan(values)
            else:
                m = pd.to_numeric(frame[task.mask], errors="coerce").to_numpy(np.float64)
                bad = ~np.isin(m, (0.0, 1.0))
                if bad.any():
                    row = first_true(bad)
                    value = frame[task.mask].iloc[row]
                    raise DataError(
                        self.source, f"task mask must be 0 or 1, got {plain(value)!r}", row=row, column=task.mask
                    )
                present = m == 1.0
                nan_labelled = present & np.isnan(values)
                if nan_labelled.any():
                    row = first_true(nan_labelled)
                    raise DataError(
                        self.source,
                        f"label is NaN but mask column {task.mask!r} says task {task.name!r} is labelled",
                        row=row,
                        column=task.label,
                    )
            if task.type is TaskType.BINARY:
                bad = present & ~np.isin(values, (0.0, 1.0))
                if bad.any():
                    row = first_true(bad)
                    raise DataError(
                        self.source,
                        f"binary label must be 0 or 1, got {float(values[row])}",
                        row=row,
                        column=task.label,
                    )
            elif (present & ~np.isfinite(values)).any():
                row = first_true(present & ~np.isfinite(values))
                raise DataError(self.source, f"label is not finite: {float(values[row])}", row=row, column=task.label)
            labels[:, j] = np.where(present, values, 0.0)
            mask[:, j] = present
        return labels, mask

    def _vocabularies(
        self, flat: Mapping[str, tuple[npt.NDArray[Any], IntArray]], given: Mapping[str, Vocabulary]
    ) -> dict[str, Vocabulary]:
        """The vocabulary of every vocab table: given (built from the train split), else built from this frame."""
        out: dict[str, Vocabulary] = {}
        for table in self.schema.vocab_tables():
            if table.name in given:
                out[table.name] = given[table.name]
                continue
            values = [flat[f.name][0] for f in self.schema.features_of_table(table.name)]
            vocab_spec = table.vocab_spec
            assert vocab_spec is not None
            out[table.name] = Vocabulary.build(table.name, _concat(values), vocab_spec.min_count)
            log.info("%s: vocabulary of table %r: %d values", self.source, table.name, len(out[table.name].tokens))
        return out

    def _categorical(self, spec: FeatureSpec, raw_values: npt.NDArray[Any], lengths: IntArray) -> Jagged:
        table = self.schema.table(spec.table)
        offsets = offsets_from_lengths(lengths)
        mapped = table_ids(raw_values, spec, table, self.source, self.vocabularies.get(table.name), offsets)
        if table.name in self.vocabularies:
            self.report.vocab_oov[spec.name] = mapped.unknown
        elif table.hash:
            self.report.hashed_ids[spec.name] = mapped.hashed
        return Jagged(mapped.ids, offsets)

    def _flatten(self, column: pd.Series, spec: FeatureSpec) -> tuple[npt.NDArray[Any], IntArray]:
        """Flat values and per-row lengths of a scalar or list-valued column (:func:`feature_values`)."""
        return feature_values(column.to_numpy(), spec, self.schema.table(spec.table), self.source)

    def _check_per_group(self, spec: FeatureSpec) -> None:
        """Rows of a group must agree on a per-group feature, since only the group's first row is kept."""
        jag = self.features[spec.name]
        sizes = np.diff(self.group_offsets)
        leader = np.repeat(self.group_offsets[:-1], sizes)
        lengths = np.diff(jag.offsets)
        differs = lengths != lengths[leader]
        same_len = ~differs
        if same_len.any():
            rows = np.flatnonzero(same_len)
            mine = jag.values[concat_ranges(jag.offsets[rows], lengths[rows])]
            theirs = jag.values[concat_ranges(jag.offsets[leader[rows]], lengths[rows])]
            mismatch = np.repeat(rows, lengths[rows])[mine != theirs]
            differs[mismatch] = True
        if differs.any():
            row = int(self.input_row[np.flatnonzero(differs)].min())
            raise DataError(
                self.source,
                f"per-group feature {spec.name!r} differs from the first row of its group "
                f"({self.schema.group_column!r})",
                row=row,
                column=spec.column,
            )

    def _timestamps(self, frame: pd.DataFrame) -> IntArray | None:
        """The timestamp column as integers; a value that is not a whole number is an error naming its row."""
        column = self.schema.timestamp_column
        if column is None:
            return None
        raw = frame[column]
        if raw.dtype.kind in "iu":
            return raw.to_numpy(np.int64)
        values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values) | (values != np.floor(values))
        if bad.any():
            row = first_true(bad)
            raise DataError(
                self.source, f"timestamp is not an integer: {plain(raw.iloc[row])!r}", row=row, column=column
            )
        return values.astype(np.int64)

    def _group_keys(self, frame: pd.DataFrame) -> npt.NDArray[Any]:
        """The group column; a missing group id is an error naming its row (NaN would form no group)."""
        column = self.schema.group_column
        if column is None:
            return np.zeros(0, dtype=np.int64)
        keys = frame[column].to_numpy()
        missing = pd.isna(keys)
        if missing.any():
            raise DataError(self.source, "missing group id", row=first_true(missing), column=column)
        return keys

    def _count_duplicates(self, frame: pd.DataFrame, features: dict[str, Jagged]) -> int:
        """Rows equal to an earlier row in every column the schema reads (lists compared as their validated ids).

        Rows are compared by a 64-bit hash of each column (lists: of their ids and positions), so two different rows
        count as one only on a hash collision (about n^2 / 2^64).
        """
        s = self.schema
        list_columns = {f.column: f.name for f in (*s.sparse_features, *s.sequence_features) if f.multi_valued}
        columns = [s.user_column, *(f.column for f in (*s.sparse_features, *s.sequence_features))]
        columns += [d.column for d in s.dense_features] + [t.label for t in s.tasks]
        columns += [t.mask for t in s.tasks if t.mask] + [c for c in (s.group_column, s.timestamp_column) if c]
        row_hash = np.zeros(len(frame), dtype=np.uint64)
        for k, column in enumerate(dict.fromkeys(columns)):
            if column in list_columns:
                col_hash = _jagged_row_hash(features[list_columns[column]])
            else:
                values = frame[column].to_numpy()
                col_hash = pd.util.hash_array(values.astype(object) if values.dtype == object else values)
            salt = np.uint64((k + 1) * 0x9E3779B97F4A7C15 % 2**64)  # each column mixes in differently
            row_hash = pd.util.hash_array(row_hash ^ (col_hash + salt))
        return int(pd.Series(row_hash).duplicated().sum())

    def _count_truncated(self, max_history: int) -> int:
        """Rows whose per-group history is longer than ``max_history`` (lengths counted on the group's rows)."""
        truncated = np.zeros(len(self), dtype=bool)
        for spec in self.schema.sequence_features:
            if spec.per_group:
                truncated |= np.diff(self.features[spec.name].offsets) > max_history
        return int(truncated.sum())

    def _dense(self, frame: pd.DataFrame) -> FloatArray:
        out = np.zeros((len(frame), len(self.schema.dense_features)), dtype=np.float32)
        for j, spec in enumerate(self.schema.dense_features):
            values = pd.to_numeric(frame[spec.column], errors="coerce").to_numpy(np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                row = first_true(bad)
                raise DataError(
                    self.source,
                    f"dense value is not a finite number: {plain(frame[spec.column].iloc[row])!r}",
                    row,
                    spec.column,
                )
            out[:, j] = values
        return out

    # ---------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_groups(self) -> int:
        return len(self.group_offsets) - 1

    def group_sizes(self) -> IntArray:
        return np.diff(self.group_offsets)

    def rows_of_groups(self, groups: IntArray) -> IntArray:
        starts = self.group_offsets[groups]
        return concat_ranges(starts, self.group_offsets[groups + 1] - starts)

    def batch_of_groups(self, groups: IntArray, candidates: IntArray | None = None) -> Batch:
        """The batch holding every row of ``groups``, groups in the given order.

        ``candidates``: item ids the next-items objective scores against in this batch (schemas with
        ``next_items`` only; none when omitted).
        """
        sizes = self.group_offsets[groups + 1] - self.group_offsets[groups]
        rows = concat_ranges(self.group_offsets[groups], sizes)
        group_index = np.repeat(np.arange(len(groups), dtype=np.int64), sizes)
        return self._assemble(rows, group_index, candidates, groups)

    def batch(self, rows: IntArray, candidates: IntArray | None = None) -> Batch:
        """A batch of arbitrary rows, each its own group (evaluation, export); per-group layout only."""
        if self.position_index is not None:
            raise ValueError(f"{self.source}: a generative dataset is batched by groups (batch_of_groups)")
        return self._assemble(np.asarray(rows, dtype=np.int64), np.arange(len(rows), dtype=np.int64), candidates)

    def _assemble(
        self, rows: IntArray, group_index: IntArray, candidates: IntArray | None = None, groups: IntArray | None = None
    ) -> Batch:
        leader = np.ones(len(rows), dtype=bool)
        leader[1:] = group_index[1:] != group_index[:-1]
        sequences = self._kjt(self.schema.sequence_features, rows, leader)
        if self.schema.next_items is not None:
            sequences = KeyedJaggedTensor.concat([sequences, spread_candidates(candidates, len(rows))])
        position_index = target_start = None
        if self.position_index is not None and self.target_start is not None and groups is not None:
            position_index = torch.from_numpy(self.position_index[rows])
            target_start = torch.from_numpy(self.target_start[groups])
        return Batch(
            position_index=position_index,
            target_start=target_start,
            sparse_features=self._kjt(self.schema.sparse_features, rows, leader),
            sequence_features=sequences,
            dense_features=torch.from_numpy(self.dense[rows]),
            labels=torch.from_numpy(self.labels[rows]),
            task_mask=torch.from_numpy(self.task_mask[rows]),
            group_index=torch.from_numpy(group_index),
            user_index=torch.from_numpy(self.user_index[rows]),
        )

    def _kjt(self, specs: Sequence[FeatureSpec], rows: IntArray, leader: npt.NDArray[np.bool_]) -> KeyedJaggedTensor:
        all_values, all_lengths = [], []
        for spec in specs:
            jag = self.features[spec.name]
            take = rows[leader] if spec.per_group else rows
            values, lengths = take_rows(jag.values, jag.offsets, take)
            if spec.per_group:
                # Non-leader rows carry nothing: the group's history is looked up and encoded once.
                full = np.zeros(len(rows), dtype=np.int64)
                full[leader] = lengths
                lengths = full
            all_values.append(values)
            all_lengths.append(lengths)
        values = np.concatenate(all_values) if all_values else np.zeros(0, dtype=np.int64)
        lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
        return KeyedJaggedTensor(
            keys=[s.name for s in specs],
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths.astype(np.int32)),
            stride=len(rows),
        )


def _concat(parts: Sequence[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    nonempty = [p for p in parts if len(p)]
    if not nonempty:
        return np.zeros(0, dtype=object)
    if len({p.dtype for p in nonempty}) > 1:
        nonempty = [p.astype(object) for p in nonempty]
    return np.concatenate(nonempty)
