"""List-valued cells as files hold them: parsed into flat values and per-row lengths, or refused with the row.

A parquet file keeps lists as lists. A CSV file keeps them as text, written by whatever produced the file, so a
list cell may be any of (docs/data.md lists them for users):

- ids joined by the feature's ``separator`` (default a space): ``1 2 3``, ``comedy romance``;
- a JSON list: ``[1, 2, 3]``, ``["comedy", "romance"]``;
- what pandas' ``to_csv`` writes for a list or a numpy array: ``['comedy', 'romance']``, ``[1 2 3]``,
  ``['comedy' 'romance']``, ``[]`` (numpy's repr, also wrapped over several lines);
- empty (an empty string or a missing value): an empty list;
- a single number: when every cell of a column holds at most one id, pandas reads the column as numbers
  (``2555.0``, and NaN for the empty ones), so a number is a list of that one id.

A token that still carries a bracket or a quote after parsing is an error naming the row: it would otherwise be
hashed or put in a vocabulary as junk. So is numpy's ``...`` (an array printed with its middle left out).

Example::

    >>> parse_list("['comedy' 'romance']", " ")
    ['comedy', 'romance']
    >>> parse_list("[1 2\\n 3]", " "), parse_list("[]", " "), parse_list("4|5", "|")
    (['1', '2', '3'], [], ['4', '5'])
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from supermoe_rec.data.errors import DataError
from supermoe_rec.data.jagged import IntArray

# One token of a bracketed list: a quoted string (Python/numpy repr, optional b prefix), a bare token, or any
# other single character, which is then an error.
_TOKEN = re.compile(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*"|[^\s,'"\[\]]+|[,\s]+|.""", re.DOTALL)
_JUNK = re.compile(r"""[\[\]'"]""")
FORMS = "ids joined by the separator, a JSON list, or pandas' list repr such as ['a' 'b'] or [1 2 3]"


class ListParseError(ValueError):
    """A list cell that is none of the accepted forms."""


def _bare(token: str, text: str) -> str:
    if _JUNK.search(token):
        raise ListParseError(f"token {token!r} of {text!r} carries a bracket or quote; accepted list forms: {FORMS}")
    return token


def parse_list(text: str, separator: str) -> list[Any]:
    """The items of one list cell written as text (see the module docstring for the forms)."""
    s = text.strip()
    if not s:
        return []
    if not s.startswith("["):
        if separator.strip():
            parts = [t.strip() for t in s.split(separator)]
            return [_bare(t, text) for t in parts if t]
        return [_bare(t, text) for t in s.split()]
    if not s.endswith("]"):
        raise ListParseError(f"{text!r} opens a list with '[' but does not close it")
    try:
        parsed = json.loads(s)
    except ValueError:
        parsed = None
    if isinstance(parsed, list):
        if any(isinstance(v, list | dict) for v in parsed):
            raise ListParseError(f"{text!r} is a nested list; a cell holds a flat list of ids")
        return parsed
    items: list[Any] = []
    for token in _TOKEN.findall(s[1:-1]):
        if token[0] in ",\t\n\r " and not token.strip(" ,\t\n\r"):
            continue
        if token == "...":
            raise ListParseError(f"{text!r} was cut short when written ('...'): write the file from lists, not arrays")
        if token[0] in "'\"" or (token[0] == "b" and len(token) > 1 and token[1] in "'\""):
            value = ast.literal_eval(token)
            items.append(value.decode() if isinstance(value, bytes) else value)
        else:
            items.append(_bare(token, text))
    return items


def _scalar_cell(cell: Any) -> list[Any] | None:
    """A number (or NaN) in a list column: the list of that one id (empty for NaN); None when not a number."""
    if cell is None:
        return []
    if isinstance(cell, bool | np.bool_):
        return None
    if isinstance(cell, int | np.integer):
        return [int(cell)]
    if isinstance(cell, float | np.floating):
        return [] if math.isnan(cell) else [float(cell)]
    return None


def flatten_lists(
    cells: npt.NDArray[Any], separator: str, source: str, column: str
) -> tuple[npt.NDArray[Any], IntArray]:
    """Flat values and per-row lengths of a list-valued column (lists, arrays, text or numbers per cell)."""
    parts: list[npt.NDArray[Any]] = []
    for row, cell in enumerate(cells):
        if isinstance(cell, str):
            try:
                items = parse_list(cell, separator)
            except ListParseError as exc:
                raise DataError(source, str(exc), row=row, column=column) from exc
            parts.append(np.array(items, dtype=object))
            continue
        scalar = _scalar_cell(cell)
        if scalar is not None:
            parts.append(np.array(scalar))
        elif pd.api.types.is_scalar(cell):
            raise DataError(source, f"expected a list of ids, got {plain(cell)!r}", row=row, column=column)
        else:
            array = np.asarray(cell)
            if array.ndim != 1:
                raise DataError(source, f"expected a flat list of ids, got {array.ndim}-d values", row, column)
            if array.dtype.kind in "US":
                array = array.astype(object)
            if array.dtype == object:
                for value in array:
                    if looks_like_list(value):
                        raise DataError(source, f"list item {value!r} is itself a list written as text", row, column)
            parts.append(array)
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    nonempty = [p for p in parts if len(p)]
    values = np.concatenate(nonempty) if nonempty else np.zeros(0, dtype=np.int64)
    return values, lengths


def looks_like_list(value: Any) -> bool:
    """A text cell that holds a bracketed list (a list column whose feature lacks ``multi_valued: true``)."""
    return isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]")


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages print ``2555.0``, not ``np.float64(2555.0)``."""
    return value.item() if isinstance(value, np.generic) else value
