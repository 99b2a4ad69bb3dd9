"""Give memory that the process has freed back to the operating system.

Training batches vary in size (a group holds one user's candidates), so every step allocates and frees tensors of
new sizes, many between 128 KiB and 32 MiB. glibc's malloc raises its mmap threshold as large blocks are freed, so
after the first steps those tensors live on the heap; freed blocks in the middle of the heap stay resident. On
ml100k a training process grew by about 12 MB per step this way (3.3 GiB peak after one epoch, 4-9 GB over a full
run) while its live memory stayed under 1 GB: with ``MALLOC_MMAP_THRESHOLD_=131072`` the same run stayed at
0.6-0.8 GB, but ran 2x slower. ``malloc_trim(0)`` every 50 steps returns the freed pages: 1.75 GiB peak after one
epoch at 1% lower speed (``benchmarks/train_memory.py``; every 10 steps: 1.46 GiB, 10% slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["release_freed_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
    return trim


def release_freed_memory() -> bool:
    """Return the heap pages that malloc holds free to the OS (glibc's ``malloc_trim(0)``).

    The call itself takes microseconds to milliseconds; the real cost is the page faults when the returned pages
    are used again, hence an interval (``RELEASE_MEMORY_EVERY`` in the trainer). Live memory is untouched, so
    results do not change.

    Returns:
        True when glibc's ``malloc_trim`` ran, False where the C library has none.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
