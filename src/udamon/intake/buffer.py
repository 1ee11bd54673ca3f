"""Bounded report buffer: the user-space ``damon_report_access()``.

Reports are appended in batches (numpy structured arrays) and taken out by
time window.  The buffer never grows past ``capacity``: what does not fit is
counted in ``dropped`` (and the record's end line says so), never lost
silently.
"""

from __future__ import annotations

import numpy as np

from udamon.intake.reports import REPORT_DTYPE
from udamon.targets.topology import nodes_of

DEFAULT_CAPACITY = 1 << 22  # ~4M reports, 160 MiB at most


class ReportBuffer:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, cpu_nodes: np.ndarray | None = None):
        """``cpu_nodes``: the CPU-to-node table that fills a report's unknown node from
        its CPU (whoever builds the buffer knows which machine the reports come from:
        this one for live reports, the recorded one for replayed input); None leaves
        unknown nodes unknown."""
        if capacity <= 0:
            raise ValueError("buffer capacity must be positive")
        self.capacity = capacity
        self.cpu_nodes = cpu_nodes
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
        if self.cpu_nodes is not None:
            need = (chunk["node"] < 0) & (chunk["cpu"] >= 0)
            if need.any():
                chunk["node"][need] = nodes_of(chunk["cpu"][need], self.cpu_nodes)
        self._chunks.append(chunk)
        self._len += n
        self.accepted += n
        return n

    def take_before(self, end_ns: int) -> np.ndarray:
        """Remove and return every report with ``time_ns < end_ns``.

        Chunks whose times are sorted (the usual case) are cut with a binary
        search, as views; only unsorted chunks pay for a boolean mask."""
        outs: list[np.ndarray] = []
        rest: list[np.ndarray] = []
        for chunk in self._chunks:
            t = chunk["time_ns"]
            if t.size > 1 and not (t[1:] >= t[:-1]).all():
                mask = t < end_ns
                outs.append(chunk[mask])
                if not mask.all():
                    rest.append(chunk[~mask])
                continue
            i = int(np.searchsorted(t, end_ns, side="left"))
            if i:
                outs.append(chunk[:i])
            if i < t.size:
                rest.append(chunk[i:])
        self._chunks = rest
        self._len = sum(int(c.size) for c in rest)
        if not outs:
            return np.empty(0, dtype=REPORT_DTYPE)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def holds_pid(self, pid: int) -> bool:
        """Whether any report waiting in the buffer is for ``pid``."""
        return any(bool((c["pid"] == pid).any()) for c in self._chunks)

    def earliest(self) -> int | None:
        if not self._chunks:
            return None
        return int(min(int(c["time_ns"].min()) for c in self._chunks))
