"""Vocabularies for ``vocab: true`` tables: values (strings, years, sparse ids) to embedding rows.

- **Built from the train file only**, over every column whose feature uses the table (the history and the target
  item share the item table, so both count).
- **Deterministic order**: by count, most frequent first, ties by the value's text. Row 0 is reserved for values
  out of the vocabulary and for padding, so the value of rank r (0-based) gets row r + 1, and the table has
  ``len(tokens) + 1`` rows.
- ``min_count: N``: values seen fewer than N times in the train file stay out of the vocabulary (row 0).
- **Values are keyed by their text**: ``5``, ``5.0`` (a CSV column with NaN) and ``"5"`` (a CSV list) are one
  value, so a parquet train file and CSV valid file agree.
- Values that map to row 0 (unknown, rare or missing) are counted per feature in the dataset report.
- Saved as ``vocab.json`` in the run dir and in every checkpoint, so export and serving use the training mapping.

Example::

    >>> v = Vocabulary.build("genre", np.array(["drama", "comedy", "drama", "noir"], dtype=object), min_count=1)
    >>> v.tokens, v.num_embeddings
    (('drama', 'comedy', 'noir'), 4)
    >>> v.lookup(np.array(["noir", "western", "drama"], dtype=object)).tolist()
    [3, 0, 1]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from supermoe_rec.data.errors import DataError
from supermoe_rec.data.jagged import IntArray

FORMAT = "supermoe_rec.vocab/1"
FILE_NAME = "vocab.json"


def _key(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


def token_keys(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Each value as its vocabulary key (text; None for a missing value); integer-valued floats print as ints."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64).astype(str).astype(object)
    if values.dtype.kind == "b":
        return values.astype(str).astype(object)
    if values.dtype.kind == "f":
        out = np.empty(len(values), dtype=object)
        finite = np.isfinite(values)
        whole = finite & (values == np.floor(np.where(finite, values, 0)))
        out[whole] = values[whole].astype(np.int64).astype(str)
        rest = finite & ~whole
        out[rest] = [repr(float(v)) for v in values[rest]]
        out[~finite] = None
        return out
    if values.dtype.kind in "US":
        return values.astype(str).astype(object)
    return np.array([_key(v) for v in values], dtype=object)


def hash_ids(values: npt.NDArray[Any], num_embeddings: int) -> IntArray:
    """Rows of a ``hash: true`` table: each value hashed as its text (5, 5.0 and "5" are one id, so a parquet and a
    CSV file agree) with pandas' fixed-key hash, so the mapping is the same across runs, machines, training and
    serving."""
    hashed = pd.util.hash_array(token_keys(values).astype(str)) % np.uint64(num_embeddings)
    return np.asarray(hashed, dtype=np.int64)


@dataclass(frozen=True)
class Vocabulary:
    """The values of one table in row order (row r + 1 holds ``tokens[r]``; row 0 = unknown and padding)."""

    table: str
    tokens: tuple[str, ...]
    min_count: int = 1
    _index: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", pd.Index(self.tokens, dtype=object))
        if not self._index.is_unique:
            raise ValueError(f"vocabulary of table {self.table!r} repeats a value")

    @property
    def num_embeddings(self) -> int:
        return len(self.tokens) + 1

    @staticmethod
    def build(table: str, values: npt.NDArray[Any], min_count: int = 1) -> Vocabulary:
        """The vocabulary of ``values`` (all occurrences in the train file), most frequent first, ties by text."""
        keys = pd.Series(token_keys(values), dtype=object).dropna()
        counts = keys.value_counts(sort=False)
        counts = counts[counts >= min_count]
        frame = pd.DataFrame({"token": counts.index.astype(str), "count": counts.to_numpy()})
        frame = frame.sort_values(["count", "token"], ascending=[False, True], kind="stable")
        return Vocabulary(table, tuple(frame["token"].tolist()), min_count)

    def lookup(self, values: npt.NDArray[Any]) -> IntArray:
        """Row of each value: 1.. for known values, 0 for unknown or missing ones."""
        if not len(values):
            return np.zeros(0, dtype=np.int64)
        rows = self._index.get_indexer(pd.Index(token_keys(values), dtype=object))
        return (np.asarray(rows, dtype=np.int64) + 1).astype(np.int64)

    def as_dict(self) -> dict[str, Any]:
        return {"min_count": self.min_count, "size": self.num_embeddings, "tokens": list(self.tokens)}


def save_vocabularies(vocabularies: Mapping[str, Vocabulary], path: str | Path) -> Path:
    """Write ``vocab.json`` (``path`` is the file, or a directory to write it into)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    body = {"format": FORMAT, "tables": {name: v.as_dict() for name, v in sorted(vocabularies.items())}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_vocabularies(path: str | Path) -> dict[str, Vocabulary]:
    """Read a ``vocab.json`` written by :func:`save_vocabularies` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise DataError(str(path), "vocabulary file not found")
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT:
            raise ValueError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
        out = {}
        for name, entry in body["tables"].items():
            tokens = tuple(str(t) for t in entry["tokens"])
            out[name] = Vocabulary(name, tokens, int(entry.get("min_count", 1)))
            if "size" in entry and int(entry["size"]) != len(tokens) + 1:
                raise ValueError(f"table {name!r}: size {entry['size']} but {len(tokens)} tokens")
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(str(path), f"not a vocabulary file: {exc}") from exc
