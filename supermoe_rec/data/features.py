"""The id/feature mapping that training and serving share: a file to a frame, a column to flat values, values to rows.

Training's reader (:class:`~supermoe_rec.data.dataset.TabularDataset`) and serving's
:class:`~supermoe_rec.serving.UserEncoder` both call these, so an event maps to the same embedding rows, with the
same errors, on either side:

- :func:`read_table`: a CSV, TSV or parquet file to a frame; a missing, empty or unreadable file is a
  :class:`DataError` naming it.
- :func:`feature_values`: one feature's column to flat values and per-row lengths. A single-valued column must hold
  scalars (a list there is an error asking for ``multi_valued: true``); a list column's cells are parsed by
  :func:`~supermoe_rec.data.lists.flatten_lists` (lists, arrays, or lists written as text).
- :func:`table_ids`: raw values to table rows: through the table's vocabulary (``vocab: true``: unknown and missing
  values to row 0, counted), hashed into range (``hash: true``: counted), or read as integer ids inside the table
  (anything else is an error naming the row and column).

Nothing here imports TorchRec: serving runs without it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from supermoe_rec.data.errors import DataError, first_true
from supermoe_rec.data.jagged import IntArray, row_of
from supermoe_rec.data.lists import flatten_lists, looks_like_list, plain
from supermoe_rec.data.schema import FeatureSpec, TableSpec
from supermoe_rec.data.vocab import Vocabulary, hash_ids

TABLE_FORMATS = ".csv, .tsv or .parquet"

__all__ = ["TABLE_FORMATS", "TableIds", "feature_values", "not_utf8", "read_table", "table_ids"]


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV or parquet table; a missing, empty or unreadable file is a :class:`DataError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), f"is a directory, not a table file (name a {TABLE_FORMATS} file)")
    if not path.is_file():
        raise DataError(str(path), "file not found")
    if path.stat().st_size == 0:
        raise DataError(str(path), "empty file")
    if path.suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataError(str(path), f"not a readable parquet file ({exc})") from exc
    elif path.suffix in (".csv", ".tsv", ".txt"):
        try:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        except pd.errors.EmptyDataError as exc:
            raise DataError(str(path), "empty file") from exc
        except UnicodeDecodeError:
            raise not_utf8(path) from None
    else:
        raise DataError(str(path), f"unknown table format {path.suffix!r} (use {TABLE_FORMATS})")
    if frame.empty:
        raise DataError(str(path), "no rows (empty table)")
    return frame


def not_utf8(path: Path) -> DataError:
    """The error for a text file that is not UTF-8: the first bad byte, its offset and its row (0 = the first row
    after the header line)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                before = chunk[: exc.start]
                bad = offset + exc.start
                row = newlines + before.count(b"\n") - 1
                return DataError(
                    str(path), f"not UTF-8 text: byte {chunk[exc.start]:#04x} at byte offset {bad}", row=max(row, 0)
                )
            offset += len(chunk)
            newlines += chunk.count(b"\n")
    return DataError(str(path), "not UTF-8 text (the file ends inside a character)")


def feature_values(
    cells: npt.NDArray[Any], spec: FeatureSpec, table: TableSpec, source: str
) -> tuple[npt.NDArray[Any], IntArray]:
    """Flat values and per-row lengths of feature ``spec``'s column ``cells`` (one cell per row).

    Raises:
        DataError: a list in a single-valued column, a missing id outside a vocab table (a vocab table maps it to
            row 0), or a list cell that cannot be parsed; naming the row and column.
    """
    if spec.multi_valued:
        # An absent list is an empty one (e.g. a user with no history yet); text cells are parsed (see lists.py).
        return flatten_lists(cells, spec.separator, source, spec.column)
    values = np.asarray(cells)
    if values.dtype == object:
        listy = np.fromiter((not pd.api.types.is_scalar(v) for v in values), dtype=bool, count=len(values))
        if listy.any():
            raise DataError(
                source, "holds a list; set multi_valued: true on this feature", int(listy.argmax()), spec.column
            )
        texts = np.fromiter((looks_like_list(v) for v in values), dtype=bool, count=len(values))
        if texts.any():
            row = first_true(texts)
            raise DataError(
                source,
                f"holds a list written as text ({values[row]!r}); set multi_valued: true on this feature",
                row,
                spec.column,
            )
    missing = pd.isna(values)
    if missing.any() and table.vocab_spec is None:
        raise DataError(source, "missing id", row=first_true(missing), column=spec.column)
    return values, np.ones(len(values), dtype=np.int64)


@dataclass(frozen=True)
class TableIds:
    """Table rows of a feature's values, and what the mapping did to them.

    Attributes:
        ids: the row of every value.
        hashed: values hashed into range (a ``hash: true`` table).
        unknown: values a vocabulary mapped to row 0 (unknown, rare or missing).
    """

    ids: IntArray
    hashed: int = 0
    unknown: int = 0


def table_ids(
    values: npt.NDArray[Any],
    spec: FeatureSpec,
    table: TableSpec,
    source: str,
    vocabulary: Vocabulary | None = None,
    offsets: IntArray | None = None,
) -> TableIds:
    """Rows of table ``table`` for the raw ``values`` of feature ``spec``.

    Args:
        values: flat raw values (from :func:`feature_values`).
        vocabulary: the table's vocabulary (a ``vocab: true`` table); None for the other tables.
        offsets: [rows + 1] offsets of ``values`` per input row, so errors name the row; None names none.

    Raises:
        DataError: a value that is not an integer id, or an id outside the table (neither vocab nor hash).

    Example::

        >>> from supermoe_rec.data.schema import FeatureSpec, TableSpec
        >>> spec = FeatureSpec(name="item", column="item", table="item")
        >>> table = TableSpec(name="item", num_embeddings=10)
        >>> table_ids(np.array([3, 7]), spec, table, "events").ids.tolist()
        [3, 7]
        >>> table_ids(np.array(["a"], dtype=object), spec, table, "events")
        Traceback (most recent call last):
        ...
        supermoe_rec.data.errors.DataError: events: column 'item': id 'a' is not an integer (set vocab: true ...
    """
    if vocabulary is not None:
        rows = np.asarray(vocabulary.lookup(values), dtype=np.int64)
        return TableIds(rows, unknown=int((rows == 0).sum()))
    num_embeddings = table.num_embeddings
    if table.hash:
        return TableIds(hash_ids(values, num_embeddings), hashed=len(values))
    if values.dtype.kind == "u" and len(values) and (values > np.iinfo(np.int64).max).any():
        values = values.astype(object)  # beyond int64: refused below, naming the row
    if values.dtype.kind in "iu":
        ids = values.astype(np.int64)
    else:
        numeric = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(np.float64)
        bad = np.isnan(numeric) | (numeric != np.floor(numeric))
        huge = ~bad & (np.abs(numeric) >= 2.0**63)
        if huge.any():
            j = first_true(huge)
            raise DataError(
                source,
                f"id {plain(values[j])!r} is outside table {spec.table!r} of {table.num_embeddings} rows (and beyond "
                "64-bit integers; set hash: true or vocab: true on the table for such ids)",
                row=None if offsets is None else row_of(offsets, j),
                column=spec.column,
            )
        if bad.any():
            j = first_true(bad)
            raise DataError(
                source,
                f"id {plain(values[j])!r} is not an integer (set vocab: true on table {spec.table!r} to map its "
                "values to ids, or hash: true to hash them)",
                row=None if offsets is None else row_of(offsets, j),
                column=spec.column,
            )
        ids = numeric.astype(np.int64)

    def row(j: int) -> int | None:
        return None if offsets is None else row_of(offsets, j)

    if (ids < 0).any():
        j = first_true(ids < 0)
        raise DataError(source, f"negative id {ids[j]}", row=row(j), column=spec.column)
    if (ids >= num_embeddings).any():
        j = first_true(ids >= num_embeddings)
        raise DataError(
            source,
            f"id {ids[j]} is outside table {spec.table!r} of {num_embeddings} rows "
            "(grow num_embeddings, or set vocab: true or hash: true on the table)",
            row=row(j),
            column=spec.column,
        )
    return TableIds(ids)
