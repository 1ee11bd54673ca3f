"""When was each page last written?  Every page of a target, with async write-protect.

The KSM advisor's write-coldness, per page: the target's writable anonymous
mappings are write-protected whole (the wp sampler of udamon.primitives.uffd
attaches and registers them), and every ``interval`` one ``PAGEMAP_SCAN`` with
``PM_SCAN_WP_MATCHING`` returns the pages written since the last one and
protects them again -- the dirty-rate estimator's exact mode, keeping *which*
pages rather than how many.  A page's last write is known to within one
interval; a mapping that appears later is watched from when it was first seen.
Cost on the target: one minor fault per page and interval at most (its first
write), ~0.7 us each (FACTS.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import RuntimeFailure
from udamon.primitives.page_scan import PAGE, SpanScanner, protect_spans
from udamon.primitives.uffd import WpPrimitive
from udamon.primitives.uffd_loop import MmGone


@dataclass
class _Track:
    armed: set[tuple[int, int]] = field(default_factory=set)
    first_seen: dict[tuple[int, int], int] = field(default_factory=dict)
    pages: list[np.ndarray] = field(default_factory=list)  # written pages, per scan
    times: list[int] = field(default_factory=list)  # ... and the scan's time
    unobserved: int = 0


@dataclass
class WriteHistory:
    """One target's result: every page written, the last time (CLOCK_MONOTONIC ns)."""

    pid: int
    start_ns: int
    end_ns: int
    written: np.ndarray  # sorted page addresses written during the observation
    last_ns: np.ndarray  # the last scan that found each written
    count: np.ndarray  # in how many intervals each was written
    spans: list[tuple[int, int, int]]  # (start, end, first seen ns) of the watched mappings
    intervals: int
    unobserved: int = 0

    def last_write(self, pages: np.ndarray) -> np.ndarray:
        """Last write time of each page (-1: never written while watched)."""
        i = np.searchsorted(self.written, pages)
        i = np.minimum(i, max(self.written.size - 1, 0))
        hit = (self.written.size > 0) & (self.written[i] == pages) if self.written.size else \
            np.zeros(pages.size, bool)
        out = np.full(pages.size, -1, dtype=np.int64)
        out[hit] = self.last_ns[i[hit]]
        return out

    def writes(self, pages: np.ndarray) -> np.ndarray:
        """In how many intervals each page was written."""
        out = np.zeros(pages.size, dtype=np.int64)
        if self.written.size == 0:
            return out
        i = np.minimum(np.searchsorted(self.written, pages), self.written.size - 1)
        hit = self.written[i] == pages
        out[hit] = self.count[i[hit]]
        return out

    def watched_since(self, pages: np.ndarray) -> np.ndarray:
        """When each page's mapping was first watched (-1: not watched: not writable)."""
        out = np.full(pages.size, -1, dtype=np.int64)
        for lo, hi, t in self.spans:
            sel = (pages >= np.uint64(lo)) & (pages < np.uint64(hi))
            out[sel & ((out < 0) | (out > t))] = t
        return out


class WriteTracker:
    def __init__(self, pids: list[int]) -> None:
        self.pids = sorted(set(pids))
        self.prim = WpPrimitive(self.pids, attribute=False, protect_resident=False)
        self.scanner = SpanScanner()
        self._t: dict[int, _Track] = {p: _Track() for p in self.pids}
        self.start_ns = 0
        self.intervals = 0

    def start(self) -> None:
        self.prim.start()
        self.start_ns = time.monotonic_ns()
        self._arm_new()

    def _arm_new(self) -> None:
        now = time.monotonic_ns()
        for pid in self.pids:
            reg = self.prim.registered(pid)
            if reg is None:
                continue
            keys = set(zip(reg.starts.tolist(), reg.ends.tolist(), strict=True))
            tr = self._t[pid]
            new = sorted(keys - tr.armed)
            if not new:
                tr.armed &= keys
                continue
            try:
                ok = protect_spans(reg.uffd, np.asarray([a for a, _ in new], np.uint64),
                                   np.asarray([b for _, b in new], np.uint64))
            except MmGone:
                self.prim.lost_mm(pid)
                continue
            for k, good in zip(new, ok.tolist(), strict=True):
                if good:
                    tr.first_seen.setdefault(k, now)
                else:
                    tr.unobserved += 1
            tr.armed = (tr.armed & keys) | {k for k, g in zip(new, ok.tolist(), strict=True) if g}

    def scan(self) -> None:
        """One interval's end: collect the pages written since the last scan."""
        now = time.monotonic_ns()
        for pid in self.pids:
            reg = self.prim.registered(pid)
            tr = self._t[pid]
            if reg is None or not tr.armed:
                continue
            keys = sorted(tr.armed)
            try:
                lo, hi, failed = self.scanner.written(
                    reg.pagemap, np.asarray([a for a, _ in keys], np.uint64),
                    np.asarray([b for _, b in keys], np.uint64), reprotect=True)
            except MmGone:
                self.prim.lost_mm(pid)
                continue
            except OSError as e:
                raise RuntimeFailure(f"scanning process {pid} failed: {e.strerror}") from None
            tr.unobserved += failed
            if lo.size:
                n = ((hi - lo) // np.uint64(PAGE)).astype(np.int64)
                starts = np.repeat(lo, n)
                offs = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
                tr.pages.append(starts + offs.astype(np.uint64) * np.uint64(PAGE))
                tr.times.append(now)
        self.intervals += 1
        self._arm_new()

    def exited(self) -> list[int]:
        return self.prim.exited()

    def stop(self) -> None:
        self.prim.stop()

    def history(self, pid: int, end_ns: int | None = None) -> WriteHistory:
        tr = self._t[pid]
        end = end_ns or time.monotonic_ns()
        if tr.pages:
            pages = np.concatenate(tr.pages)
            times = np.concatenate([np.full(p.size, t, np.int64)
                                    for p, t in zip(tr.pages, tr.times, strict=True)])
            order = np.lexsort((times, pages))
            pages, times = pages[order], times[order]
            last = np.r_[pages[1:] != pages[:-1], True]
            uniq, counts = np.unique(pages, return_counts=True)
            written, last_ns = pages[last], times[last]
            assert np.array_equal(uniq, written)
        else:
            written = np.zeros(0, np.uint64)
            last_ns = counts = np.zeros(0, np.int64)
        spans = [(a, b, t) for (a, b), t in sorted(tr.first_seen.items())]
        return WriteHistory(pid, self.start_ns, end, written, last_ns, counts, spans,
                            self.intervals, tr.unobserved)
