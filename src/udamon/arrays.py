"""numpy helpers for the monitoring loop's hot paths.

``np.unique(a)`` without return_* arguments asks ``np.ma.is_masked`` first, and
the first such call imports ``numpy.ma`` (~0.08 s of CPU) in the middle of a
live session; a sort and a neighbour comparison is also cheaper for the small
integer arrays used here.
"""

from __future__ import annotations

import numpy as np


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a``, sorted (what ``np.unique(a)`` returns)."""
    s = np.sort(np.asarray(a).ravel())
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


# -- records (structured arrays) ------------------------------------------------------
#
# numpy copies a structured array field by field, and REPORT_DTYPE's packed (unaligned)
# fields take its slow path: measured here, a[mask] of 10k reports 488 us, a 3-way
# concatenate of 3400 444 us, a copy of 3400 107 us.  Viewed as opaque records of the
# same size (np.void), the same copies are plain memcpy: 26, 21 and 5 us.

def _opaque(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype((np.void, a.dtype.itemsize)))


def select_rows(a: np.ndarray, sel) -> np.ndarray:
    """``a[sel]`` (a mask, indices or a slice) of a structured array, copied as raw
    records."""
    return _opaque(a)[sel].view(a.dtype)


def copy_rows(a: np.ndarray) -> np.ndarray:
    """``a.copy()`` of a structured array, as raw records."""
    return _opaque(a).copy().view(a.dtype)


def concat_rows(parts) -> np.ndarray:
    """``np.concatenate(parts)`` of structured arrays of one dtype, as raw records."""
    parts = list(parts)
    if len(parts) == 1:
        return copy_rows(parts[0])
    dt = parts[0].dtype
    if any(p.dtype != dt for p in parts):
        return np.concatenate(parts)  # numpy's own rules (and errors) for mixed dtypes
    return np.concatenate([_opaque(p) for p in parts]).view(dt)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def keep_freed_memory(mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> None:
    """Let glibc's malloc keep freed memory for the next aggregation's arrays.

    A live session allocates and frees the same 0.1-2 MiB arrays every aggregation
    (each sampling's reports, their concatenation, the region columns).  By default
    glibc maps such blocks fresh and returns them on free, so every aggregation paid
    for their page faults again: at 100k faults/s, 0.9 ms of a 5 ms aggregation
    (bench/analysis.md).  Blocks below ``mmap_threshold`` now come from the heap, and
    up to ``trim_threshold`` of free heap stays mapped; peak RSS is unchanged (the memory
    was resident at the peak anyway).  Process-wide, once; a no-op off glibc."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
    mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
