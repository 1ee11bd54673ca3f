"""Names for regions and threads: which mappings a region overlaps (a snapshot's
table of named spans, from /proc/PID/maps) and what a thread is called (its comm).

``NameTracker`` keeps both for a live session's targets and hands each snapshot its
target's current tables (``Snapshot.names``, ``Snapshot.threads``); the record
writer stores only what changed (docs/record-format.md, keys ``names`` and
``threads``), the reader carries them forward.  Replayed input has no /proc to
read: its snapshots have no names, and reports say so instead of guessing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from udamon.errors import RuntimeFailure, TargetGone
from udamon.targets.names import NamedSpan, named_spans, task_ids, thread_comm
from udamon.targets.procmaps import parse_maps, read_maps_text

UNMAPPED = "(unmapped)"  # a region in a hole between mappings (DAMON's regions cover them)
# a thread is read again for this long after it was first seen: a new thread usually
# names itself (pthread_setname_np) right after it starts, maybe after udamon looked
YOUNG_NS = 2_000_000_000
YOUNG_READS = 128  # young threads read again per listing at most


# -- regions ---------------------------------------------------------------------


def region_mappings(table: Sequence[NamedSpan], start: np.ndarray,
                    end: np.ndarray) -> list[list[str]]:
    """Per region [start[i], end[i]), the distinct names of the spans it overlaps, the
    one with the most bytes in it first (ties: lower address), UNMAPPED among them
    for the bytes no span covers (a hole between mappings: DAMON's regions include
    them); [UNMAPPED] for a region wholly in a hole."""
    n = len(start)
    if not table:
        return [[UNMAPPED] for _ in range(n)]
    ss = np.asarray([s for s, _, _ in table], dtype=np.float64)
    se = np.asarray([e for _, e, _ in table], dtype=np.float64)
    names = [x for _, _, x in table]
    order = np.argsort(ss, kind="stable")
    ss, se, names = ss[order], se[order], [names[i] for i in order.tolist()]
    rs = np.asarray(start, dtype=np.float64)
    re_ = np.asarray(end, dtype=np.float64)
    disjoint = bool(np.all(ss[1:] >= se[:-1]))
    hi = np.searchsorted(ss, re_, side="left")  # spans starting before the region ends
    lo = np.searchsorted(se, rs, side="right") if disjoint else np.zeros(n, dtype=np.int64)
    out = []
    for i in range(n):
        a, b = int(lo[i]), int(hi[i])
        over = np.maximum(np.minimum(se[a:b], re_[i]) - np.maximum(ss[a:b], rs[i]), 0.0)
        got: dict[str, float] = {}
        for k in np.flatnonzero(over > 0).tolist():
            nm = names[a + k]
            got[nm] = got.get(nm, 0.0) + float(over[k])
        hole = float(re_[i] - rs[i]) - float(over.sum())
        if hole > 0:
            got[UNMAPPED] = got.get(UNMAPPED, 0.0) + hole
        out.append(sorted(got, key=lambda x: -got[x]))  # stable: address order on ties
    return out


def cut_at_spans(lo: np.ndarray, hi: np.ndarray, table: Sequence[NamedSpan]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ranges [lo[i], hi[i]) (sorted, disjoint) cut at the table's span boundaries,
    and for each piece a key that differs between pieces of different mappings (the
    last span starting at or below it; -1: a hole), so that they are never joined."""
    if not table or lo.size == 0:
        return lo, hi, np.full(lo.size, -1, dtype=np.int64)
    spans = sorted((s, e) for s, e, _ in table)
    ss = np.asarray([s for s, _ in spans], dtype=np.uint64)
    se = np.asarray([e for _, e in spans], dtype=np.uint64)
    reach = np.maximum.accumulate(se)  # a union of tables may overlap
    bounds = np.unique(np.concatenate((lo, hi, ss, se)))
    plo, phi = bounds[:-1], bounds[1:]
    i = np.searchsorted(lo, plo, side="right") - 1  # the range holding each piece
    keep = i >= 0
    keep[keep] = plo[keep] < hi[i[keep]]
    plo, phi = plo[keep], phi[keep]
    j = np.searchsorted(ss, plo, side="right") - 1  # the last span starting at or below
    inside = j >= 0
    inside[inside] = plo[inside] < reach[j[inside]]
    return plo, phi, np.where(inside, j, -1).astype(np.int64)


def join_names(names: Sequence[str], short: bool = False, width: int = 24) -> str:
    """One cell for a region's names: ``a``, ``a+b``, or ``a (+N)`` for the one with
    the most bytes and N others.  ``short``: long paths shortened."""
    if not names:
        return UNMAPPED
    shown = [short_name(x, width) for x in names] if short else list(names)
    if len(shown) == 1:
        return shown[0]
    if len(shown) == 2:
        return f"{shown[0]}+{shown[1]}"
    return f"{shown[0]} (+{len(shown) - 1})"


def short_name(name: str, width: int = 24) -> str:
    """A name that fits a table column: a long path as ``.../basename`` (the directory
    is the hint that there is more), other long names cut with ``...``."""
    if len(name) <= width:
        return name
    if name.startswith("/"):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        deleted = " (deleted)"
        tail = deleted if base.endswith(deleted) else ""
        base = base.removesuffix(deleted)
        room = max(width - 4 - len(tail), 8)
        if len(base) > room:
            base = base[:room - 3] + "..."
        return ".../" + base + tail
    if name.endswith("]"):
        return name[:max(width - 4, 4)] + "...]"
    return name[:max(width - 3, 4)] + "..."


def union_tables(tables: Sequence[Sequence[NamedSpan] | None]) -> list[NamedSpan] | None:
    """The distinct spans of several tables (a summed snapshot's regions come from all
    of them); None when none is known."""
    known = [t for t in tables if t is not None]
    if not known:
        return None
    return sorted({tuple(x) for t in known for x in t})  # type: ignore[misc]


# -- threads ---------------------------------------------------------------------


def thread_label(tid: int | str, names: dict[int, str] | None) -> str:
    """``tid (comm)``, or the tid alone when its name is not known (it exited before
    it could be read, or the record has no thread names)."""
    try:
        name = (names or {}).get(int(tid))
    except ValueError:  # "other", "unknown"
        name = None
    return f"{tid} ({name})" if name else str(tid)


def probe_label(probe: str, names: dict[int, str] | None) -> str:
    """A probe's name for people: ``thread:<tid>`` with the thread's name."""
    if probe.startswith("thread:"):
        tid = probe[len("thread:"):]
        if tid.isdigit():
            return "thread:" + thread_label(tid, names)
    return probe


# -- live ------------------------------------------------------------------------


class _Target:
    def __init__(self, pid: int, vmas: Callable[[], list] | None, now: int):
        self.pid = pid
        self.vmas = vmas  # the range provider's last parsed VMAs (None: read maps here)
        self.last_vmas: object = None
        self.table: list[NamedSpan] | None = None
        self.read_ns = -1  # when maps were last read here (no provider)
        self.threads: dict[int, str] = {}
        self.listed: set[int] = set()
        self.young: dict[int, int] = {}  # tid -> first seen
        self.gone = False
        self.listed_ns = now
        self.listing(now)

    def listing(self, now: int) -> None:
        """Read the names of threads that are new since the last listing (a tid that
        shows up again is a new thread too), and again those of young threads that
        still have the process's name (they have not named themselves yet), at most
        YOUNG_READS of them per listing in turn: 1000 threads started at once cost
        27 ms a listing when all were read each time, 1.2 ms for the listing alone."""
        self.listed_ns = now
        tids = task_ids(self.pid)
        if tids is None:
            self.gone = True
            return
        fresh = tids - self.listed
        self.listed = tids
        changed: dict[int, str] = {}
        for tid in fresh:
            self.young.pop(tid, None)
            self.young[tid] = now
            name = thread_comm(self.pid, tid)
            if name is not None and self.threads.get(tid) != name:
                changed[tid] = name
        unnamed = {None, changed.get(self.pid, self.threads.get(self.pid))}
        again = []
        for tid, seen in list(self.young.items()):
            if tid not in tids or now - seen > YOUNG_NS:
                del self.young[tid]
            elif tid not in fresh and changed.get(tid, self.threads.get(tid)) in unnamed:
                again.append(tid)
        for tid in again[:YOUNG_READS]:
            self.young[tid] = self.young.pop(tid)  # to the back: the others go first next
            name = thread_comm(self.pid, tid)
            if name is not None and self.threads.get(tid) != name:
                changed[tid] = name
        if changed:  # a new dict: snapshots keep the one they were given
            self.threads = {**self.threads, **changed}


class NameTracker:
    """Mapping names and thread names of a live session's targets.

    ``add(pid, provider)`` reads the target's threads' names; its mapping names come
    from the range provider's last parsed VMAs (``provider.vmas()``, read once per
    update interval for the monitor anyway), or from /proc/PID/maps read here at most
    every ``update_ns`` when the ranges were given.  ``annotate(snap)`` (the live
    loop's hook) gives the snapshot its target's current tables and reads the names of
    threads that appeared since the previous listing (listed after an interval with
    reports, while young threads may still rename, and at least every ``update_ns``)."""

    def __init__(self, update_ns: int = 1_000_000_000,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.update_ns = update_ns
        self.clock = clock
        self._targets: dict[int, _Target] = {}

    def add(self, pid: int, provider=None) -> None:
        vmas = getattr(provider, "vmas", None)
        t = _Target(pid, vmas if callable(vmas) else None, self.clock())
        self._targets[pid] = t
        self._mappings(t, self.clock())

    def threads(self, pid: int) -> dict[int, str]:
        t = self._targets.get(pid)
        return dict(t.threads) if t is not None else {}

    def table(self, pid: int) -> list[NamedSpan] | None:
        t = self._targets.get(pid)
        return t.table if t is not None else None

    def annotate(self, snap) -> None:
        t = self._targets.get(snap.pid)
        if t is None:
            return
        now = self.clock()
        if not t.gone:
            # list the threads when the interval had reports (a new thread may have
            # made them), while young threads may still name themselves, and at least
            # every update interval; an idle target's listing each aggregation cost
            # ~80 us of a ~660 us idle aggregation
            if (getattr(snap, "nr_reports", 1) or t.young
                    or now - t.listed_ns >= self.update_ns):
                t.listing(now)
            self._mappings(t, now)
        snap.names = t.table
        snap.threads = t.threads

    def _mappings(self, t: _Target, now: int) -> None:
        if t.vmas is not None:
            vmas = t.vmas()
            if vmas is not None and vmas is not t.last_vmas:
                t.last_vmas = vmas
                t.table = named_spans(vmas)
            return
        if t.read_ns >= 0 and now - t.read_ns < self.update_ns:
            return
        t.read_ns = now
        try:
            table = named_spans(parse_maps(read_maps_text(t.pid)))
        except (TargetGone, RuntimeFailure):  # gone, or not readable: keep what is known
            return
        if table and table != t.table:
            t.table = table
