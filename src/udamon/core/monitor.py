"""The DAMON engine over access reports.

``Monitor`` is what the CLI and library users drive: add targets, feed reports
(``report_access`` / ``report_batch``), and ``advance(now_ns)``; every
aggregation interval that ends by ``now_ns`` is closed and returned as one
``Snapshot`` per target.  Time comes from the caller, so the same engine runs
live (monotonic clock) and on replayed input (the input's clock).

Per aggregation, in mm/damon/core.c order: count accesses (a region is
accessed in a sampling interval when a report that passes the sample filters
lands in it; probes count the same way with their own filters), update ages,
merge adjacent similar regions, tune intervals, emit the snapshot, reset,
split at random, and follow VMA changes every update interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from udamon.arrays import concat_rows, select_rows, sorted_unique
from udamon.core.attrs import Attrs
from udamon.core.names import join_names, region_mappings
from udamon.core.regions import PAGE, Regions, SplitDraws
from udamon.errors import TargetGone
from udamon.intake.buffer import DEFAULT_CAPACITY, ReportBuffer
from udamon.intake.reports import empty, make
from udamon.primitives.base import SuppliedRegions
from udamon.probes.filters import Filter, evaluate
from udamon.probes.probe import Probe
from udamon.targets.topology import cpu_to_node

# Counting with a regions x sampling-intervals bitmap is fastest while it is small; past
# this many cells (256 KiB) the distinct (region, interval) pairs are counted instead.
DENSE_CELLS = 1 << 18

# re-reads a target's ranges: (the ranges to monitor, the mapped spans within them[, the
# mergeable spans: private anonymous memory, what KSM could merge]); the
# kernel's vaddr operations own this for DAMON, and udamon.targets.procmaps.vaddr_provider
# is the same heuristic for a process (the Session passes it in)
Spans = list[tuple[int, int]]
RangeProvider = Callable[[], tuple[Spans, Spans] | tuple[Spans, Spans, Spans]]


def _provided(provider: RangeProvider) -> tuple[Spans, Spans, Spans | None]:
    """A provider's (ranges, mapped, mergeable); mergeable is None when it says nothing."""
    got = provider()
    return got[0], got[1], (got[2] if len(got) > 2 else None)


@dataclass
class Target:
    pid: int
    regions: Regions
    provider: RangeProvider | None = None  # re-reads the ranges every update interval
    name: str = ""
    exited: bool = False  # the process is gone (its last aggregation is still emitted)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    mapped: list[tuple[int, int]] | None = None  # mapped spans inside ranges (VMA targets)
    mergeable: list[tuple[int, int]] | None = None  # ... of which private anonymous
    closed: bool = False  # exited and its last snapshot emitted
    mapped_changed: bool = True  # mapped or mergeable changed since a snapshot said it
    # this interval's reports with page nodes (for the snapshot's page_nodes and numa)
    window_reports: list[np.ndarray] = field(default_factory=list)
    window_numa: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name,
                "ranges": [[int(s), int(e)] for s, e in self.ranges],
                "follows_vmas": self.provider is not None}


@dataclass
class Snapshot:
    """One target's regions at the end of one aggregation interval."""

    time_ns: int  # end of the aggregation interval
    start_ns: int  # its start
    pid: int
    sample_us: int
    start: np.ndarray
    end: np.ndarray
    nr_accesses: np.ndarray
    age: np.ndarray
    probe_hits: dict[str, np.ndarray]
    nr_reports: int = 0  # reports for this target in the interval, before sample filters
    nr_passed: int = 0  # ... of which passed the sample filters and landed in a region
    # regions x nodes: the distinct reported pages of the interval by the node that
    # held them (column n: node n; reports with a page_node); None: no page node known
    page_nodes: np.ndarray | None = None
    # NUMA locality of the interval's reports that passed the sample filters and landed
    # in a region, when page nodes are known: {"local": n, "remote": n, "unknown": n,
    # "threads": {"<tid>": [local, remote, unknown]}}; exact counts, independent of
    # the region boundaries
    numa: dict | None = None
    # the target's mappings as (start, end, name) spans in address order, and its
    # threads' names {tid: comm}, as udamon.core.names.NameTracker knew them when the
    # snapshot was taken (live targets; None: not known, e.g. replayed input)
    names: list[tuple[int, int, str]] | None = None
    threads: dict[int, str] | None = None
    # per region, distinct pages written in the interval (None: not counted)
    written_pages: np.ndarray | None = None
    # the target's mapped spans, when they changed since its previous snapshot (the
    # reader carries them forward); None: unchanged or not known
    mapped: list[tuple[int, int]] | None = None
    # the parts of mapped that are private anonymous memory, what KSM could merge
    # (written, and carried forward, like mapped)
    mergeable: list[tuple[int, int]] | None = None
    # keys of an estimator's snapshot kept as they are (record/format.py ESTIMATE_KEYS)
    extra: dict | None = None

    @property
    def aggr_us(self) -> int:
        return (self.time_ns - self.start_ns) // 1000

    def region_mappings(self) -> list[list[str]] | None:
        """Per region, the names of the mappings it overlaps, most bytes first ([] for a
        hole between mappings); None when the snapshot has no names."""
        if self.names is None:
            return None
        return region_mappings(self.names, self.start, self.end)

    def region_names(self, short: bool = False) -> list[str] | None:
        """Per region, one name: ``a``, ``a+b`` or ``a (+N)`` (udamon.core.names.join_names;
        ``short``: long paths as ``.../basename``); None when the snapshot has no names."""
        per = self.region_mappings()
        return None if per is None else [join_names(x, short) for x in per]

    def region_page_nodes(self) -> list[dict[int, int]]:
        """Per region, {node: pages} of the nodes holding any of its reported pages
        (empty dicts when no page node is known)."""
        pn = self.page_nodes
        if pn is None:
            return [{} for _ in range(self.start.size)]
        return [{int(n): int(row[n]) for n in np.flatnonzero(row)} for row in pn]


@dataclass
class MonitorStats:
    accepted: int = 0
    dropped: int = 0  # reports the bounded buffer could not take
    unmatched: int = 0  # reports for pids that are not targets
    outside: int = 0  # reports outside every region of their target
    late: int = 0  # reports older than the interval they were counted in


class Monitor:
    def __init__(self, attrs: Attrs | None = None, filters: Sequence[Filter] = (),
                 probes: Sequence[Probe] = (), *, seed: int | None = None,
                 buffer_capacity: int = DEFAULT_CAPACITY, min_region_sz: int = PAGE,
                 count_written_pages: bool = True, sampled: bool = False,
                 cpu_nodes: np.ndarray | None | str = "local"):
        """``count_written_pages``: also count, per region, the distinct pages that
        passing write reports touched in each aggregation (what a dirty rate needs
        from an observational primitive; a controlled one samples a page per region,
        so it turns this off).  ``sampled``: each report is one region's sample (a
        controlled primitive), so it stands for the region's pages in the snapshots'
        locality counts (``numa``) instead of for one page.  ``cpu_nodes``: the
        CPU-to-node table that fills reports' unknown nodes ("local": this machine's,
        for live reports; a table from udamon.targets.topology.parse_cpu_nodes for
        input recorded on another machine; None: unknown stays unknown)."""
        if isinstance(cpu_nodes, str):
            if cpu_nodes != "local":
                raise ValueError('cpu_nodes must be "local", a table or None')
            cpu_nodes = cpu_to_node()
        self.count_written_pages = count_written_pages
        self.sampled = sampled
        self.attrs = (attrs or Attrs()).validate()
        self.filters = tuple(filters)
        self.probes = tuple(probes)
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ValueError("probe names must be unique")
        self.targets: list[Target] = []
        self.buffer = ReportBuffer(buffer_capacity, cpu_nodes)
        # called with the reports each aggregation counts (page nodes filled): a sink
        # that keeps the report stream (udamon record --keep-reports) sets it
        self.report_tap: Callable[[np.ndarray], None] | None = None
        self._started_ns: int | None = None  # the session's start (Monitor.start)
        self._supplied: set[int] = set()  # targets a regions primitive supplied
        self.rng = np.random.default_rng(seed)
        self._split_draws = SplitDraws(self.rng)
        self.min_region_sz = min_region_sz
        self.window_start: int | None = None
        self._last_update_ns: int | None = None
        self._aggrs_since_tune = 0
        self._last_nr_regions = 0
        self._unmatched = 0
        self._outside = 0
        self._late = 0

    # -- configuration ---------------------------------------------------------

    def add_target(self, pid: int, ranges: Sequence[tuple[int, int]] | None = None,
                   *, name: str | None = None, provider: RangeProvider | None = None) -> Target:
        """Monitor ``pid`` over ``ranges``, or over what ``provider`` says and follow it
        every update interval (``udamon.targets.procmaps.vaddr_provider(pid)``: DAMON's
        three-region heuristic over /proc/PID/maps, as the kernel's vaddr operations)."""
        if any(t.pid == pid for t in self.targets):
            raise ValueError(f"pid {pid} is already a target")
        mapped: list[tuple[int, int]] | None = None
        mergeable: list[tuple[int, int]] | None = None
        if ranges is None:
            if provider is None:
                raise ValueError("give the ranges to monitor, or a provider of them "
                                 "(udamon.targets.procmaps.vaddr_provider(pid) follows the "
                                 "process's memory maps)")
            ranges, mapped, mergeable = _provided(provider)
            if not ranges:
                raise TargetGone(f"process {pid} has no memory mappings (a kernel thread?)")
        else:
            provider = None
        if name is None:
            name = getattr(provider, "name", "") or ""
        ranges = sorted((int(s), int(e)) for s, e in ranges)
        for (s0, e0), (s1, _) in zip(ranges[:-1], ranges[1:], strict=False):
            if s1 < e0:
                raise ValueError(f"ranges overlap: {s0:#x}-{e0:#x} and {s1:#x}")
        regions = Regions.evenly_split(ranges, self.attrs.min_nr_regions, len(self.probes),
                                       self.min_region_sz)
        t = Target(pid, regions, provider, name or "", ranges=list(ranges), mapped=mapped,
                   mergeable=mergeable)
        self.targets.append(t)
        return t

    def target(self, pid: int) -> Target:
        for t in self.targets:
            if t.pid == pid:
                return t
        raise KeyError(pid)

    # -- intake ----------------------------------------------------------------

    def report_access(self, *, pid: int, addr: int, time_ns: int, size: int = PAGE,
                      tid: int = -1, cpu: int = -1, node: int = -1, write: bool = False,
                      source: str | int = "api") -> bool:
        """One access report (the user-space damon_report_access()).  Returns False
        when the bounded buffer was full and the report was counted as dropped."""
        return self.buffer.add(make(time_ns=time_ns, pid=pid, addr=addr, size=size, tid=tid,
                                    cpu=cpu, node=node, write=write, source=source)) == 1

    def report_batch(self, reports: np.ndarray) -> int:
        """A numpy batch of REPORT_DTYPE; returns how many were accepted."""
        return self.buffer.add(reports)

    @property
    def stats(self) -> MonitorStats:
        return MonitorStats(self.buffer.accepted, self.buffer.dropped, self._unmatched,
                            self._outside, self._late)

    # -- time ------------------------------------------------------------------

    def start(self, now_ns: int) -> None:
        """Set the start of the first aggregation interval (else: first advance/report)."""
        if self.window_start is None:
            self.window_start = int(now_ns)
            self._last_update_ns = int(now_ns)
            self._started_ns = int(now_ns)

    @property
    def window_end(self) -> int | None:
        if self.window_start is None:
            return None
        return self.window_start + self.attrs.aggr_us * 1000

    def advance(self, now_ns: int) -> list[Snapshot]:
        """Close every aggregation interval that ends at or before ``now_ns``."""
        if self.window_start is None:
            first = self.buffer.earliest()
            self.start(first if first is not None else now_ns)
        out: list[Snapshot] = []
        while self.window_end is not None and self.window_end <= now_ns:
            out.extend(self._close_window())
        return out

    def sampling_addresses(self, pid: int) -> np.ndarray:
        """One random page-aligned address per region, for controlled primitives to arm."""
        return self.sampling_plan(pid, 1)[0]

    def sampling_plan(self, pid: int, turns: int) -> np.ndarray:
        """``turns`` x regions random page-aligned addresses, one per region per sampling
        interval of the coming aggregation (damon_va_prepare_access_checks' sampling
        address, drawn ahead for the whole interval: regions change only when it ends)."""
        r = self.target(pid).regions
        sz = (r.end - r.start).astype(np.float64)
        off = (self.rng.random((turns, len(r))) * sz).astype(np.uint64)
        return (r.start + off) & ~np.uint64(self.min_region_sz - 1)

    # -- one aggregation -------------------------------------------------------

    def _count(self, t: Target, reports: np.ndarray, ws: int,
               we: int | None = None) -> tuple[int, int]:
        """Count the interval's reports into the target's regions.  ``we``: the end of a
        supplier's interval, whose wall time (however long it took) holds exactly
        aggr_samples of the supplier's sampling intervals."""
        r = t.regions
        nsamp = self.attrs.aggr_samples
        if reports.size == 0:
            return 0, 0
        if we is None:
            k = (reports["time_ns"] - ws) // (self.attrs.sample_us * 1000)
        else:
            k = (reports["time_ns"] - ws) * nsamp // max(we - ws, 1)
        self._late += int((k < 0).sum())
        k = np.clip(k, 0, nsamp - 1)
        ridx = r.index_of(reports["addr"])
        inside = ridx >= 0
        self._outside += int((~inside).sum())

        nr = len(r)
        dense = nsamp * nr <= DENSE_CELLS
        # each report's (region, sampling interval) cell, once for every count below
        # (meaningless outside the regions, which no mask passed to count selects)
        cell = ridx * nsamp + k

        def count(mask: np.ndarray) -> np.ndarray:
            """Per region, the sampling intervals in which a report of ``mask`` landed."""
            if dense:  # a small intervals x regions bitmap
                seen = np.zeros(nr * nsamp, dtype=bool)
                seen[cell[mask]] = True
                return seen.reshape(nr, nsamp).sum(axis=1)
            # many sampling intervals (e.g. 1 us in 1 s): distinct (region, interval)
            # pairs, so memory follows the reports, not intervals x regions
            return np.bincount(sorted_unique(cell[mask]) // nsamp, minlength=nr)

        passed = evaluate(self.filters, reports) & inside
        r.nr_accesses += count(passed)
        if (reports["page_node"] >= 0).any():
            every = bool(passed.all())  # (passed implies inside) no copy when all count
            t.window_reports.append(reports if every else select_rows(reports, inside))
            weight = None
            if self.sampled:  # a sample stands for its region: weigh it by its pages
                weight = ((r.end - r.start) // np.uint64(PAGE)).astype(np.int64)[ridx[passed]]
            t.window_numa.append(_locality(reports if every else select_rows(reports, passed),
                                          weight))
        if self.count_written_pages:
            w = passed & reports["write"]
            if w.any():
                r.written_pages += r.count_distinct(reports["addr"][w] // np.uint64(PAGE),
                                                    0, 1)[:, 0]
        for i, p in enumerate(self.probes):
            r.probe_hits[i] += count(evaluate(p.filters, reports) & inside)
        return int(reports.size), int(passed.sum())

    def begin_window(self, now_ns: int) -> None:
        """Controlled sampling: the running interval's turns start at ``now_ns`` (closing
        the previous interval took that long), so the interval starts there too."""
        if self.window_start is None or now_ns > self.window_start:
            self.window_start = int(now_ns)

    def close(self, end_ns: int) -> list[Snapshot]:
        """Close the running aggregation interval at ``end_ns`` (controlled sampling: an
        aggregation is its sampling turns, however long they took, as kdamond counts
        samples rather than wall time); the next one starts there."""
        if self.window_start is None or end_ns <= self.window_start:
            return []
        # the reports of the interval's turns sit on its nominal sampling grid (a turn
        # cut short by a stop may end before its report's time): take them all
        nominal = self.window_start + self.attrs.aggr_us * 1000
        return self._close_window(int(end_ns), take_until=max(int(end_ns), nominal))

    def flush(self, now_ns: int) -> list[Snapshot]:
        """End the session: close the running aggregation interval early at ``now_ns``
        (a shorter last snapshot, so the reports in it are not lost) when it has lasted
        at least one sampling interval and some target still owes a snapshot."""
        out = self.advance(now_ns)
        ws = self.window_start
        if (ws is not None and now_ns - ws >= self.attrs.sample_us * 1000
                and any(not t.closed for t in self.targets)):
            out.extend(self._close_window(int(now_ns)))
        return out

    def _close_window(self, end_ns: int | None = None,
                      take_until: int | None = None) -> list[Snapshot]:
        """One aggregation interval ends: kdamond_fn's steps after the sampling."""
        assert self.window_start is not None
        ws, we = self.window_start, end_ns if end_ns is not None else self.window_end
        assert we is not None
        # a target that exited during this interval still gets it: its last accesses
        live = [t for t in self.targets if not t.closed]
        counts = self._check_accesses(live, take_until if take_until is not None else we, ws)
        self._merge_regions(live)
        sample_us = self.attrs.sample_us  # the interval's, before tuning changes it
        self._aggrs_since_tune += 1
        goal = self.attrs.intervals_goal
        if goal.enabled and self._aggrs_since_tune >= goal.aggrs:
            self._aggrs_since_tune = 0
            self._tune_intervals(live)
        snaps = [self._snapshot(t, ws, we, sample_us, counts.get(t.pid, (0, 0)))
                 for t in live]
        self._reset_aggregated(live)
        self._split_regions([t for t in live if not t.closed])
        self.window_start = we
        assert self._last_update_ns is not None
        if we - self._last_update_ns >= self.attrs.update_us * 1000:
            self._last_update_ns = we
            self.update_ranges()
        return snaps

    def _check_accesses(self, live: list[Target], until_ns: int,
                        ws: int) -> dict[int, tuple[int, int]]:
        """kdamond's check_accesses for the interval: count the reports before
        ``until_ns`` into their target's regions; per pid (reports, passed)."""
        reports = self.buffer.take_before(until_ns)
        if self.report_tap is not None and reports.size:
            self.report_tap(reports)
        counts: dict[int, tuple[int, int]] = {}
        if reports.size:
            pids = reports["pid"]
            matched = np.zeros(reports.size, dtype=bool)
            for t in live:
                sel = pids == t.pid
                matched |= sel
                # one target's interval (the usual case): its reports as they are
                counts[t.pid] = self._count(t, reports if len(live) == 1 and sel.all()
                                            else select_rows(reports, sel), ws)
            self._unmatched += int((~matched).sum())
        return counts

    def _merge_regions(self, live: list[Target]) -> None:
        """kdamond_merge_regions: threshold from the hottest region, doubled while there
        are too many regions (ages updated first, against the same threshold).  Weighted
        probes (a DAMON probe's weight) each get a threshold the same way, from the
        region with the most weighted hits."""
        sums = [t.regions.summary() for t in live]  # (bytes, highest nr_accesses)
        thres = max((hi for _, hi in sums), default=0) // 10
        weighted = [(i, p.weight, max((int(t.regions.probe_hits[i].max(initial=0))
                                       for t in live), default=0) * p.weight // 10)
                    for i, p in enumerate(self.probes) if p.weight]
        total = sum(sz for sz, _ in sums)
        sz_limit = max(total // self.attrs.min_nr_regions, self.min_region_sz)
        for t in live:
            t.regions.update_ages(thres)
        while True:
            for t in live:
                t.regions.merge(thres, sz_limit, weighted)
            nr = sum(len(t.regions) for t in live)
            if nr <= self.attrs.max_nr_regions or thres >= self.attrs.aggr_samples:
                break
            thres = max(1, thres * 2)
            weighted = [(i, w, max(1, th * 2)) for i, w, th in weighted]

    def _snapshot(self, t: Target, ws: int, we: int, sample_us: int,
                  counts: tuple[int, int]) -> Snapshot:
        """The target's regions as the interval leaves them (DAMON's after_aggregation
        callback sees the same)."""
        r = t.regions
        page_nodes = numa = None
        if t.window_reports:
            page_nodes = _pages_by_node(r, t.window_reports[0] if len(t.window_reports) == 1
                                        else concat_rows(t.window_reports))
            numa = _merge_locality(t.window_numa)
            t.window_reports, t.window_numa = [], []
        snap = Snapshot(we, ws, t.pid, sample_us, r.start.copy(), r.end.copy(),
                        r.nr_accesses.copy(), r.age.copy(),
                        {p.name: r.probe_hits[i].copy() for i, p in enumerate(self.probes)},
                        counts[0], counts[1], page_nodes=page_nodes,
                        written_pages=(r.written_pages.copy()
                                       if self.count_written_pages else None),
                        mapped=(list(t.mapped) if t.mapped is not None
                                and t.mapped_changed else None), numa=numa,
                        mergeable=(list(t.mergeable) if t.mergeable is not None
                                   and t.mapped_changed else None))
        t.mapped_changed = False
        return snap

    def _reset_aggregated(self, live: list[Target]) -> None:
        """kdamond_reset_aggregated; an exited target whose last reports are all counted
        is closed (a primitive that delivers late, another process's pipeline, may still
        have some for a later interval in the buffer)."""
        for t in live:
            t.regions.reset_aggregated()
            if t.exited and not self.buffer.holds_pid(t.pid):
                t.closed = True

    def _split_regions(self, live: list[Target]) -> None:
        """kdamond_split_regions: 2 pieces each, 3 when the count did not change and
        there is room, while at most half of max_nr_regions."""
        nr = sum(len(t.regions) for t in live)
        if nr <= self.attrs.max_nr_regions // 2:
            subs = 3 if (nr == self._last_nr_regions
                         and nr < self.attrs.max_nr_regions // 3) else 2
            for t in live:
                t.regions.split(subs, self._split_draws, self.min_region_sz)
            self._last_nr_regions = nr

    def supply(self, batch: Sequence[SuppliedRegions]) -> list[Snapshot]:
        """A regions primitive (the kernel's DAMON) ended one aggregation: each target's
        supplied regions become its regions, with the supplier's nr_accesses, age and
        probe hits (its split, merge and age rules made them: udamon applies none of its
        own).  Reports buffered for a target before the aggregation's end count as hits
        of udamon's own probes over those regions (and in nr_reports / nr_passed), so
        another primitive can supply the origin (CPU, thread, write) of the accesses the
        supplier counts.  Returns one snapshot per target of the batch still monitored."""
        if not batch:
            return []
        end_ns = max(int(b.end_ns) for b in batch)
        if self.window_start is None:
            self.start(min(int(b.start_ns) for b in batch))
        # in the supplier's order: two aggregations of one target in a batch are two
        # snapshots, each over its own regions with the reports of its own interval
        pool = empty(0)
        out: list[Snapshot] = []
        done: list[Target] = []
        for b in sorted(batch, key=lambda b: int(b.end_ns)):
            got = self.buffer.take_before(int(b.end_ns))
            if got.size:
                if self.report_tap is not None:
                    self.report_tap(got)
                pool = concat_rows([pool, got]) if pool.size else got
            try:
                t = self.target(b.pid)
            except KeyError:
                continue
            if t.closed:
                continue
            t.regions = Regions(b.start, b.end, len(self.probes))
            sel = (pool["pid"] == t.pid) & (pool["time_ns"] < int(b.end_ns))
            ws = int(b.start_ns)
            if t.pid not in self._supplied:  # the first: it holds what came before too
                self._supplied.add(t.pid)  # (observers attach before the session starts)
                ws = min(ws, self._started_ns if self._started_ns is not None else ws,
                         int(pool["time_ns"][sel].min()) if sel.any() else ws)
            counts = self._count(t, select_rows(pool, sel), ws, int(b.end_ns))
            pool = select_rows(pool, ~sel)
            r = t.regions
            r.nr_accesses = np.asarray(b.nr_accesses, dtype=np.int64).copy()
            r.age = np.asarray(b.age, dtype=np.int64).copy()
            snap = self._snapshot(t, ws, int(b.end_ns), int(b.sample_us), counts)
            snap.probe_hits.update({k: np.asarray(v, dtype=np.int64).copy()
                                    for k, v in b.probe_hits.items()})
            out.append(snap)
            done.append(t)
        self._unmatched += int(pool.size)  # reports of no target the supplier covered
        self._reset_aggregated(done)
        self.window_start = end_ns
        assert self._last_update_ns is not None
        if end_ns - self._last_update_ns >= self.attrs.update_us * 1000:
            self._last_update_ns = end_ns
            self.update_ranges()  # the mapped spans (the supplier follows the mappings)
        return out

    def update_ranges(self) -> None:
        """Follow VMA changes (damon_va_update); a target that is gone is marked exited."""
        for t in self.targets:
            if t.exited or t.provider is None:
                continue
            try:
                ranges, mapped, mergeable = _provided(t.provider)
            except TargetGone:
                t.exited = True
                continue
            if not ranges:
                t.exited = True
                continue
            if mapped != t.mapped or mergeable != t.mergeable:
                t.mapped, t.mergeable = mapped, mergeable
                t.mapped_changed = True
            if ranges != t.ranges:
                t.ranges = ranges
                t.regions.set_ranges(ranges, self.min_region_sz)

    def _tune_intervals(self, live: list[Target]) -> None:
        """kdamond_tune_intervals: feedback loop toward ``access_bp`` of the maximum
        possible access events, scaling the sampling interval."""
        sizes = [t.regions.sizes().astype(np.int64) for t in live]
        accs = [t.regions.nr_accesses for t in live]
        new = tuned_sample_us(self.attrs.sample_us, self.attrs.aggr_samples,
                              np.concatenate(sizes) if sizes else np.zeros(0, np.int64),
                              np.concatenate(accs) if accs else np.zeros(0, np.int64),
                              self.attrs.intervals_goal)
        if new is not None:
            self.attrs = self.attrs.with_sample_us(max(new, 1))


def tuned_sample_us(sample_us: int, aggr_samples: int, sizes: np.ndarray,
                    nr_accesses: np.ndarray, goal) -> int | None:
    """The next sampling interval (None: unchanged) of mm/damon/core.c's
    kdamond_tune_intervals, with damon_get_intervals_score and
    damon_get_intervals_adaptation_bp, in the kernel's integer arithmetic."""
    sz = [int(x) for x in sizes]
    max_events = sum(sz) * aggr_samples
    events = sum(a * int(n) for a, n in zip(sz, nr_accesses, strict=True))
    target = max_events * goal.access_bp // 10_000 or 1
    score = events * 10_000 // target  # mult_frac(access_events, 10000, target)
    adaptation = _feed_loop_next_input(100_000_000, score) // 10_000
    if adaptation <= 10_000:
        adaptation = 5_000 + adaptation // 2
    if adaptation == 10_000:
        return None  # the kernel leaves the attributes as they are
    new = min(goal.max_sample_us, sample_us * adaptation // 10_000)
    return max(goal.min_sample_us, new)


MAX_LOCALITY_THREADS = 256  # per snapshot; the rest are summed under "other"


def _locality(reports: np.ndarray, weight: np.ndarray | None = None) -> dict:
    """Local / remote / unknown counts of reports (each counting ``weight``, default 1),
    in all and per thread."""
    cn, pn = reports["node"], reports["page_node"]
    known = (cn >= 0) & (pn >= 0)
    kind = np.where(known, np.where(cn == pn, 0, 1), 2)  # 0 local, 1 remote, 2 unknown
    tot = [int(x) for x in np.bincount(kind, weights=weight, minlength=3).round()]
    tids = reports["tid"]
    threads: dict[str, list[int]] = {}
    if tids.size:
        ut = sorted_unique(tids)
        idx = np.searchsorted(ut, tids)
        m = np.bincount(idx * 3 + kind, weights=weight,
                        minlength=ut.size * 3).round().astype(np.int64).reshape(ut.size, 3)
        order = np.argsort(-m.sum(axis=1), kind="stable")
        for j, i in enumerate(order.tolist()):
            tid = int(ut[i])
            key = ("other" if j >= MAX_LOCALITY_THREADS else
                   str(tid) if tid >= 0 else "unknown")  # unknown: no thread known
            prev = threads.get(key, [0, 0, 0])
            threads[key] = [a + b for a, b in zip(prev, m[i].tolist(), strict=True)]
    return {"local": tot[0], "remote": tot[1], "unknown": tot[2], "threads": threads}


def _merge_locality(parts: list[dict]) -> dict:
    out = {"local": 0, "remote": 0, "unknown": 0, "threads": {}}
    for p in parts:
        for k in ("local", "remote", "unknown"):
            out[k] += p[k]
        for tid, v in p["threads"].items():
            prev = out["threads"].get(tid, [0, 0, 0])
            out["threads"][tid] = [a + b for a, b in zip(prev, v, strict=True)]
    return out


def _pages_by_node(r: Regions, reports: np.ndarray) -> np.ndarray:
    """Regions of ``r`` x nodes: the distinct reported pages by the node that held them."""
    known = (reports["page_node"] >= 0) & (reports["page_node"] < 1024)  # MAX_NUMNODES
    if not known.any():
        return np.zeros((len(r), 0), dtype=np.int64)
    # distinct (page, node) pairs: the page number with the node in the low 10 bits
    pn = reports["page_node"][known]
    key = (((reports["addr"][known] // np.uint64(PAGE)) << np.uint64(10))
           | pn.astype(np.uint64))
    return r.count_distinct(key, 10, int(pn.max()) + 1)


ULONG_MAX = (1 << 64) - 1


def _feed_loop_next_input(last_input: int, score: int) -> int:
    """damon_feed_loop_next_input from mm/damon/core.c (unsigned long arithmetic)."""
    goal = 10_000
    min_input = 10_000
    if score == goal:
        return last_input
    if score >= goal * 2:
        return min_input
    over = score > goal
    diff = score - goal if over else goal - score
    if last_input < ULONG_MAX // diff:
        compensation = last_input * diff // goal
    else:
        compensation = last_input // goal * diff
    if over:
        return max(last_input - compensation, min_input)
    if last_input < ULONG_MAX - compensation:
        return last_input + compensation
    return ULONG_MAX
