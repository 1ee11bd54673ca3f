"""Bounded report buffer: the user-space ``damon_report_access()``.

Reports are appended in batches (numpy structured arrays) and taken out by
time window.  The buffer never grows past ``capacity``: what does not fit is
counted in ``dropped`` (and the record's end line says so), never lost
silently.
"""

from __future__ import annotations

import numpy as np

from udamon.arrays import concat_rows, copy_rows, select_rows
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
        self._spans: list[tuple[int, int]] = []  # each chunk's (earliest, latest) time
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
        chunk = copy_rows(reports)
        if self.cpu_nodes is not None:
            need = (chunk["node"] < 0) & (chunk["cpu"] >= 0)
            if need.any():
                chunk["node"][need] = nodes_of(chunk["cpu"][need], self.cpu_nodes)
        t = chunk["time_ns"]
        self._chunks.append(chunk)
        self._spans.append((int(t.min()), int(t.max())))
        self._len += n
        self.accepted += n
        return n

    def take_before(self, end_ns: int) -> np.ndarray:
        """Remove and return every report with ``time_ns < end_ns``.

        A chunk wholly before (or after) ``end_ns`` is taken (or kept) whole: the
        usual case, as a session takes its interval's reports after the interval.
        A chunk that straddles it is cut with a binary search when its times are
        sorted; only unsorted ones (per-CPU rings read in turn) pay for a mask."""
        outs: list[np.ndarray] = []
        rest: list[np.ndarray] = []
        spans: list[tuple[int, int]] = []
        for chunk, (lo, hi) in zip(self._chunks, self._spans, strict=True):
            if hi < end_ns:
                outs.append(chunk)
                continue
            if lo >= end_ns:
                rest.append(chunk)
                spans.append((lo, hi))
                continue
            t = chunk["time_ns"]
            if not (t[1:] >= t[:-1]).all():
                mask = t < end_ns
                outs.append(select_rows(chunk, mask))
                kept = select_rows(chunk, ~mask)
            else:
                i = int(np.searchsorted(t, end_ns, side="left"))
                outs.append(chunk[:i])
                kept = chunk[i:]
            rest.append(kept)
            kt = kept["time_ns"]
            spans.append((int(kt.min()), int(kt.max())))
        self._chunks, self._spans = rest, spans
        self._len = sum(int(c.size) for c in rest)
        if not outs:
            return np.empty(0, dtype=REPORT_DTYPE)
        return outs[0] if len(outs) == 1 else concat_rows(outs)

    def holds_pid(self, pid: int) -> bool:
        """Whether any report waiting in the buffer is for ``pid``."""
        return any(bool((c["pid"] == pid).any()) for c in self._chunks)

    def earliest(self) -> int | None:
        if not self._chunks:
            return None
        return min(lo for lo, _ in self._spans)
