"""Vectorised numpy helpers for jagged (values, offsets) columns.

A jagged column of N rows is ``values`` (flat, int64) plus ``offsets`` [N+1]: row i holds
``values[offsets[i]:offsets[i+1]]``. Everything here is loop-free, so batch assembly costs O(batch) numpy work.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def concat_ranges(starts: IntArray, lengths: IntArray) -> IntArray:
    """Indices ``[s0, s0+1, .., s0+l0-1, s1, ..]`` for the given starts and lengths, without a Python loop.

    Example::

        >>> concat_ranges(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist()
        [5, 6, 9, 10, 11]
    """
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Each output position = its range's start + (position - where that range begins in the output).
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - out_starts, lengths) + np.arange(total, dtype=np.int64)


def take_rows(values: IntArray, offsets: IntArray, rows: IntArray) -> tuple[IntArray, IntArray]:
    """Values and lengths of ``rows`` of a jagged column, in the given row order.

    Example::

        >>> v, l = take_rows(np.array([1, 2, 3, 4]), np.array([0, 1, 1, 4]), np.array([2, 0]))
        >>> v.tolist(), l.tolist()
        ([2, 3, 4, 1], [3, 1])
    """
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return values[concat_ranges(starts, lengths)], lengths


def offsets_from_lengths(lengths: IntArray) -> IntArray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def row_of(offsets: IntArray, flat_index: int) -> int:
    """The row holding flat position ``flat_index`` (for error messages)."""
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)
