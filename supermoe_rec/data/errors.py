"""The one error type for bad input data: it always names the file (or table), and the row and column if known."""

from __future__ import annotations


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
