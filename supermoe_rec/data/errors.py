"""The one error type for bad input data: it always names the file (or table), and the row and column if known."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class DataError(ValueError):
    """Bad input data.

    Example::

        >>> str(DataError("ratings.csv", "negative id -3", row=17, column="item_id"))
        "ratings.csv: row 17, column 'item_id': negative id -3"
    """

    def __init__(self, source: str, message: str, row: int | None = None, column: str | None = None) -> None:
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        location = f"{source}: {', '.join(where)}" if where else source
        super().__init__(f"{location}: {message}")
        self.source = source
        self.row = row
        self.column = column


def first_true(mask: npt.ArrayLike) -> int:
    """Position of the first True in a boolean mask that has one: the row an error message names.

    Example::

        >>> first_true([False, True, True])
        1
    """
    return int(np.flatnonzero(np.asarray(mask))[0])
