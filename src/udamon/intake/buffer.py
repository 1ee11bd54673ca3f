"""Bounded report buffer: the user-space ``damon_report_access()``.

Reports are appended in batches (numpy structured arrays) and taken out by
time window.  The buffer never grows past ``capacity``: what does not fit is
counted in ``dropped`` (and the record's end line says so), never lost
silently.
"""

from __future__ import annotations

import numpy as np

from udamon.intake.reports import REPORT_DTYPE, make
from udamon.targets.topology import nodes_of

DEFAULT_CAPACITY = 1 << 22  # ~4M reports, 160 MiB at most


class ReportBuffer:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity <= 0:
            raise ValueError("buffer capacity must be positive")
        self.capacity = capacity
        self._chunks: list[np.ndarray] = []
        self._len = 0
        self.dropped = 0
        self.accepted = 0

    def __len__(self) -> int:
        return self._len

    def add(self, reports: np.ndarray) -> int:
        """Append a batch; returns how many were accepted (the rest are counted as dropped)."""
        if not isinstance(reports, np.ndarray) or reports.dtype != REPORT_DTYPE:
            raise TypeError("reports must be a numpy array of udamon.REPORT_DTYPE "
                            "(build one with udamon.reports.make)")
        n = reports.shape[0]
        room = self.capacity - self._len
        if n > room:
            self.dropped += n - room
            reports = reports[:room]
            n = room
        if n == 0:
            return 0
        chunk = reports.copy()
        need = (chunk["node"] < 0) & (chunk["cpu"] >= 0)
        if need.any():
            chunk["node"][need] = nodes_of(chunk["cpu"][need])
        self._chunks.append(chunk)
        self._len += n
        self.accepted += n
        return n

    def add_one(self, **fields) -> bool:
        return self.add(make(**fields)) == 1

    def take_before(self, end_ns: int) -> np.ndarray:
        """Remove and return every report with ``time_ns < end_ns``."""
        if not self._chunks:
            return np.empty(0, dtype=REPORT_DTYPE)
        all_ = self._chunks[0] if len(self._chunks) == 1 else np.concatenate(self._chunks)
        mask = all_["time_ns"] < end_ns
        if mask.all():
            out, rest = all_, None
        else:
            out, rest = all_[mask], all_[~mask]
        self._chunks = [rest] if rest is not None and rest.size else []
        self._len = 0 if rest is None else int(rest.size)
        return out

    def earliest(self) -> int | None:
        if not self._chunks:
            return None
        return int(min(int(c["time_ns"].min()) for c in self._chunks))
