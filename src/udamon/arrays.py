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
