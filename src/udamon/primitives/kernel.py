"""The ``kernel`` primitive: the kernel's own DAMON as udamon's monitor.

udamon starts a kdamond of its own (``kernel_sysfs.Kdamond``: never one it did
not start) with udamon's monitoring attributes: ``vaddr`` on the ``--pid``
processes (``fvaddr`` when ``--range`` fixes the virtual ranges), ``paddr`` with
``--paddr`` over the given physical ranges or all System RAM.  Probes whose
filters the kernel can evaluate (``anon``, ``memcg``; 7.2+) become kernel probes,
with their 7.3 ``weight`` (attributes-only monitoring).  The kernel does the
sampling, the split and merge and the ages; every aggregation it ends is read
back exactly from its ``damon:damon_aggregated`` tracepoints
(``kernel_trace.AggregationTracer``, on udamon's kdamond thread only) or, where
tracepoints cannot be read, from its ``stat`` scheme's ``tried_regions`` (which
misses aggregations while udamon reads), and handed to the session as
``SuppliedRegions``: the kernel's regions become the monitor's (kind ``regions``).

What it cannot see: who made an access (CPU, node, thread) or how (read or
write); the kernel's per-CPU and write sample filters are not upstream.  Its
coverage is ``controlled``: the kernel samples one page per region per sampling
interval, so 0 means sampled and not accessed.

Probes on ``vaddr``: Linux 7.3's vaddr operations do not apply probes (only
paddr has ``apply_probes``), which no sysfs file tells.  So when probes are set
and there is room (the kernel takes four), one more probe without filters is
added, which every sample hits; when its hits stay 0 in the first aggregation,
the operations do not count probes and the session stops with that reason.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

from udamon.errors import RuntimeFailure, UsageError
from udamon.intake.reports import empty
from udamon.primitives.base import Primitive, PrimitiveStats, SuppliedRegions
from udamon.probes.filters import KERNEL_ONLY_TYPES
from udamon.system.kernel_sysfs import (
    ADMIN,
    Kdamond,
    KdamondSpec,
    KernelProbe,
    check_probe_filters,
    kernel_available,
)
from udamon.system.kernel_trace import AggregationTracer, Grouper, tracepoints_available
from udamon.system.sysctl_guard import DEFAULT_STATE_DIR, SettingsGuard, apply_tracefs
from udamon.system.sysctl_guard import restore_stale as _restore_stale
from udamon.targets.procmaps import is_alive

if TYPE_CHECKING:  # the core is above the primitives: only its type, not its code
    from udamon.core.attrs import Attrs

READERS = ("auto", "tracepoint", "tried-regions")
PADDR_PID = 0  # the record's target id for the physical address space
_CALIBRATION = "\0calibration"  # the always-hit probe's key (never in a record)
MAX_PROBES = 4  # DAMON_MAX_PROBES in Linux 7.2/7.3 (the kernel is asked, this is a hint)


class KernelPrimitive(Primitive):
    name = "kernel"
    kind = "regions"
    coverage = "controlled"

    def __init__(self, attrs: Attrs, *, paddr: bool = False,
                 ranges: list[tuple[int, int]] | None = None,
                 probes: list[KernelProbe] | None = None, reader: str = "auto",
                 root: str = ADMIN, state_dir: str = DEFAULT_STATE_DIR,
                 first_aggregation_timeout_s: float = 30.0):
        """``ranges``: paddr's physical ranges, or fixed virtual ones (fvaddr); None: a
        process's mappings (vaddr).  ``probes``: kernel probes (a session gives them
        through ``claim_probes``)."""
        if reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}")
        self.attrs = attrs
        self.paddr = paddr
        self.ranges = list(ranges) if ranges else []
        self.probes = list(probes or [])
        check_probe_filters(self.probes)
        if paddr and not ranges:
            raise UsageError("the kernel's paddr operations need physical ranges")
        self.reader = reader
        self.root = root
        self.state_dir = state_dir
        self.first_timeout_s = first_aggregation_timeout_s
        self.ops = "paddr" if paddr else ("fvaddr" if self.ranges else "vaddr")
        self.kdamond: Kdamond | None = None
        self._guard: SettingsGuard | None = None
        self._tracer: AggregationTracer | None = None
        self._grouper: Grouper | None = None
        self._pids: list[int] = []
        self._exited: set[int] = set()
        self._last_end: dict[int, int] = {}
        self._pending: list[SuppliedRegions] = []
        self._notes: list[str] = []
        self._warnings: list[str] = []
        self._aggregations = 0
        self._missed = 0  # tried-regions reader: aggregations that passed unread
        self._calibrate = False
        self._stopped = False
        self.reader_used = ""

    def claim_probes(self, probes: list) -> list[str]:
        """The probes whose filters are all the kernel's probe filters (anon, memcg) are
        the kernel's (their weight is the kernel's 7.3 weight); the others (CPU, thread,
        read/write) stay udamon's, counted over the kernel's regions from the reports of
        the observational primitives in the session (kernel,hint)."""
        kp = [KernelProbe(p.name, tuple(p.filters), int(getattr(p, "weight", 0)))
              for p in probes if all(f.type in KERNEL_ONLY_TYPES for f in p.filters)]
        check_probe_filters(kp)
        self.probes = kp
        return [p.name for p in kp]

    # -- start ---------------------------------------------------------------------
    def start(self, pids: list[int]) -> None:
        ok, why = kernel_available(self.root, state_dir=self.state_dir)
        if not ok:
            raise RuntimeFailure(why)
        self._pids = [PADDR_PID] if self.paddr else list(pids)
        for line in _restore_stale(self.state_dir):
            self._notes.append(f"restored settings left by a crashed udamon: {line}")
        self._calibrate = bool(self.probes) and len(self.probes) < MAX_PROBES
        targets: list[tuple[int | None, list[tuple[int, int]]]]
        if self.paddr:
            targets = [(None, self.ranges)]
        else:
            targets = [(pid, self.ranges) for pid in self._pids]
        spec = KdamondSpec(self.ops, self.attrs, targets, self.probes, self._calibrate)
        try:
            self._guard = SettingsGuard(handle_signals=False, state_dir=self.state_dir)
            reader = self._choose_reader()
            self._one_target(reader)
            self.kdamond = Kdamond(spec, self._guard, root=self.root)
            self.kdamond.start()
            if reader == "tracepoint":
                try:
                    self._open_tracer()
                except RuntimeFailure as e:
                    if self.reader == "tracepoint":
                        raise
                    self._notes.append(f"reading tried_regions instead of the tracepoints: {e}")
                    reader = "tried-regions"
                    self._one_target(reader)
            self.reader_used = reader
            self._notes.append(
                f"kernel DAMON: kdamond {self.kdamond.idx} (pid {self.kdamond.pid}), "
                f"{self.ops} operations, aggregations read from "
                + ("its damon:damon_aggregated tracepoints" if reader == "tracepoint"
                   else "its stat scheme's tried_regions (aggregations that end while udamon "
                        "reads are missed)"))
            if any(p.weight for p in self.probes):
                self._notes.append(
                    "probe weights are set: the kernel adjusts regions by the weighted probe "
                    "hits and turns access checks off, so nr_accesses stay 0 "
                    "(attributes-only monitoring)")
            if self._calibrate:
                self._check_probes_counted()
        except BaseException:
            self.stop()
            raise

    def _one_target(self, reader: str) -> None:
        if reader == "tried-regions" and len(self._pids) > 1:
            raise RuntimeFailure("the tried_regions reader takes one target (its stat "
                                 "scheme's regions do not say whose they are); several "
                                 "need the DAMON tracepoints")

    def _choose_reader(self) -> str:
        if self.reader == "tried-regions":
            return "tried-regions"
        ok, why = tracepoints_available()
        if not ok:
            if self.reader == "tracepoint":
                raise RuntimeFailure(f"cannot read the DAMON tracepoints: {why}")
            self._notes.append(f"reading tried_regions instead of the tracepoints: {why}")
            return "tried-regions"
        assert self._guard is not None
        self._notes.extend(apply_tracefs(self._guard))
        return "tracepoint"

    def _open_tracer(self) -> None:
        kd = self.kdamond
        assert kd is not None
        if kd.pid <= 0:
            raise RuntimeFailure("the kdamond's pid is not known")
        # one aggregation is nr_regions records of 72 (80 with probes) bytes: room for
        # 8 aggregations of max_nr_regions, as a power of two of pages
        need = 8 * self.attrs.max_nr_regions * 80 // 4096 + 1
        pages = 1 << max(4, min(12, (need - 1).bit_length()))
        self._tracer = AggregationTracer(
            kd.pid, kd.nr_probes, pages=pages,
            wakeup_events=max(1, self.attrs.min_nr_regions),
            tune=self.attrs.intervals_goal.enabled).open()
        self._grouper = Grouper(self.attrs.aggr_us * 1000, kd.nr_probes)

    def _check_probes_counted(self) -> None:
        """Wait for the first aggregation; the always-hit probe must have hits."""
        timeout = max(self.first_timeout_s, 40 * self.attrs.aggr_us / 1e6)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.wait(0.1)
            got = self._collect()
            if got:
                self._pending.extend(got)
                first = got[0]
                hits = first.probe_hits.get(_CALIBRATION)
                if hits is not None and int(hits.sum()) == 0:
                    raise RuntimeFailure(
                        f"the kernel's {self.ops} operations do not count probes (a probe "
                        "without filters, which every sample hits, had no hits in the first "
                        "aggregation; Linux 7.3 applies probes in paddr only): probes "
                        + ", ".join(repr(p.name) for p in self.probes)
                        + " need paddr, the physical address space")
                self._notes.append(f"checked: the kernel's {self.ops} operations count probes")
                return
            if self.kdamond is not None and not self.kdamond.running:
                raise RuntimeFailure("udamon's kdamond stopped before its first aggregation "
                                     "(the targets exited?)")
        raise RuntimeFailure(f"no aggregation from the kernel's DAMON within {timeout:.0f} s")

    # -- while it runs -------------------------------------------------------------
    def wait(self, timeout_s: float) -> bool:
        if self._tracer is not None:
            return self._tracer.wait(timeout_s)
        if self.reader_used == "tried-regions" and self.kdamond is not None:
            return True  # aggregations() blocks until the kernel's next aggregation
        time.sleep(timeout_s)
        return False

    def aggregations(self) -> list[SuppliedRegions]:
        out, self._pending = self._pending, []
        out.extend(self._collect())
        for agg in out:
            agg.probe_hits.pop(_CALIBRATION, None)
        return out

    def _collect(self) -> list[SuppliedRegions]:
        kd = self.kdamond
        if kd is None:
            return []
        if self._tracer is not None and self._grouper is not None:
            aggs = self._grouper.feed(self._tracer.read())
            return [self._supplied(a.target, a.time_ns, a.start, a.end, a.nr_accesses, a.age,
                                   a.probe_hits,
                                   self._tracer.sample_us_at(a.time_ns, self.attrs.sample_us))
                    for a in aggs]
        if not kd.running:
            return []
        try:
            t, regions = kd.tried_regions()
        except RuntimeFailure:
            if not kd.running:  # the targets exited: the kdamond stopped by itself
                return []
            raise
        n = len(regions)
        arr = np.array([r[:4] for r in regions], dtype=np.uint64).reshape(n, 4)
        hits = np.array([r[4] for r in regions], dtype=np.int64).reshape(n, kd.nr_probes).T
        # one target here (the reader keeps one stat scheme, whose tried regions mix the
        # targets; kernel_primitive_make refuses several targets with this reader)
        prev = self._last_end.get(self._pids[0])
        aggr_ns = self.attrs.aggr_us * 1000
        if prev is not None:
            self._missed += max(0, round((t - prev) / aggr_ns) - 1)
        return [self._supplied(0, t, arr[:, 0], arr[:, 1], arr[:, 2].astype(np.int64),
                               arr[:, 3].astype(np.int64), hits, self.attrs.sample_us,
                               start_ns=t - aggr_ns)]

    def _supplied(self, target: int, end_ns: int, start, end, nr, age, hits, sample_us: int,
                  start_ns: int | None = None) -> SuppliedRegions:
        assert self.kdamond is not None
        pid = self._pids[target] if target < len(self._pids) else -1
        if start_ns is None:
            # the first one: the tracepoints were opened just after the kdamond started,
            # so its first aggregation may have passed unseen
            prev = self._last_end.get(pid)
            start_ns = prev if prev is not None else max(
                self.kdamond.started_ns, end_ns - self.attrs.aggr_us * 1000)
        self._last_end[pid] = end_ns
        self._aggregations += 1
        names = [p.name for p in self.probes] + ([_CALIBRATION] if self._calibrate else [])
        probe_hits = {n: np.asarray(hits[i], dtype=np.int64) for i, n in enumerate(names)
                      if i < len(hits)}
        return SuppliedRegions(pid, int(start_ns), int(end_ns), int(sample_us),
                               np.asarray(start, dtype=np.uint64), np.asarray(end, dtype=np.uint64),
                               np.asarray(nr, dtype=np.int64), np.asarray(age, dtype=np.int64),
                               probe_hits)

    def poll(self, now_ns: int) -> np.ndarray:
        return empty(0)  # the kernel reports aggregations, not accesses

    def exited(self) -> list[int]:
        if self.paddr:
            return []
        out = []
        for pid in self._pids:
            if pid not in self._exited and not is_alive(pid):
                self._exited.add(pid)
                out.append(pid)
        return out

    def stats(self) -> PrimitiveStats:
        header = {}
        end = {}
        if self.kdamond is not None:
            header = {"kernel": {**self.kdamond.describe(), "reader": self.reader_used}}
            end = {"kernel": {"aggregations": self._aggregations,
                              "broken_aggregations": (self._grouper.dropped
                                                      if self._grouper is not None else 0),
                              "missed_aggregations": self._missed}}
        lost = self._tracer.lost if self._tracer is not None else 0
        return PrimitiveStats(lost_samples=lost, notes=list(self._notes),
                              warnings=list(self._warnings), end=end, header=header)

    def stop(self) -> None:
        """Close the tracepoints, turn the kdamond off and remove it (the guard's restore:
        state -> off, then nr_kdamonds back).  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._tracer is not None:
                self._tracer.close()
            if self._grouper is not None:
                self._grouper.flush()
        finally:
            if self._guard is not None:
                self._notes.extend(self._guard.restore())
            kd = self.kdamond
            if kd is not None and kd.idx is not None:
                left = os.path.join(self.root, "kdamonds", str(kd.idx), "state")
                try:
                    with open(left) as f:
                        if f.read().strip() == "on":
                            self._warnings.append(f"udamon's kdamond {kd.idx} is still on "
                                                  f"after the session: {left}")
                except OSError:
                    pass  # removed with nr_kdamonds: as it should be
