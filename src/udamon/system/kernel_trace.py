"""Read a kdamond's aggregations from the kernel's own tracepoints.

At the end of every aggregation, ``kdamond_reset_aggregated()`` (mm/damon/core.c)
fires one ``damon:damon_aggregated`` event per region of every target, in target
and address order, with the region's ``nr_accesses`` and ``age`` just before they
are reset; with probes set it also fires ``damon:damon_region_aggregated``, which
carries the probe hits (a ``__data_loc`` byte array, one byte per probe).  Interval
auto-tuning fires ``damon:damon_monitor_intervals_tune`` with the new sampling
interval.

udamon opens these with ``perf_event_open`` on the kdamond *thread* (``pid`` = the
kdamond's pid, ``cpu`` = -1): it sees only its own kdamond's events, never another
kdamond's, and every aggregation is in the ring buffer, none skipped however slow
udamon is (up to the ring's size).  This is exact, and cheaper than asking the
kernel for the stat scheme's ``tried_regions`` after every aggregation (the
fallback, when tracepoints cannot be used): see docs/kernel-damon.md for the
measurements.

``Grouper`` turns the stream of region records back into aggregations: a target's
aggregation is complete when it has ``nr_regions`` records in ascending address
order from one reset (records of one reset are microseconds apart; aggregations
are at least a sampling interval apart).  A group broken by lost records is
dropped and counted.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import RuntimeFailure
from udamon.system.mounts import is_mounted
from udamon.system.perf_ring import (
    ATTR_DISABLED,
    ATTR_USE_CLOCKID,
    CLOCK_MONOTONIC,
    PERF_EVENT_IOC_DISABLE,
    PERF_EVENT_IOC_ENABLE,
    PERF_SAMPLE_RAW,
    PERF_SAMPLE_TIME,
    PERF_TYPE_TRACEPOINT,
    PerfEventAttr,
    Ring,
    SampleParser,
    ioctl,
    perf_event_open,
    raw_size_for,
    sample_dtype,
    syscall_known,
)

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
AGGREGATED = "damon/damon_aggregated"
REGION_AGGREGATED = "damon/damon_region_aggregated"
INTERVALS_TUNE = "damon/damon_monitor_intervals_tune"
SAMPLE_TYPE = PERF_SAMPLE_TIME | PERF_SAMPLE_RAW
_FIELDS = ("target_id", "nr_regions", "start", "end", "nr_accesses", "age")
_FORMATS = {8: "<u8", 4: "<u4"}


def find_event(name: str) -> str | None:
    for root in TRACEFS_DIRS:
        d = os.path.join(root, "events", name)
        if os.path.exists(os.path.join(d, "id")):
            return d
    return None


def read_format(text: str) -> dict[str, tuple[int, int]]:
    """A tracepoint's format file -> field name -> (offset, size) in its raw data."""
    out = {}
    for m in re.finditer(r"field:([^;]*?)(\w+)(\[\])?;\s*offset:(\d+);\s*size:(\d+);", text):
        out[m.group(2)] = (int(m.group(4)), int(m.group(5)))
    return out


def tracepoints_available() -> tuple[bool, str]:
    """Whether the aggregation tracepoints can be read here (and why not).  Mounts
    nothing (the primitive mounts tracefs through its settings guard)."""
    if not syscall_known():
        return False, "perf_event_open is not known on this architecture"
    if find_event(AGGREGATED) is None:
        root = TRACEFS_DIRS[0]
        if os.path.isdir(root) and not is_mounted(root):
            return True, f"tracefs is not mounted; the session mounts it on {root}"
        return False, f"no {AGGREGATED} tracepoint under {' or '.join(TRACEFS_DIRS)}"
    return True, ""


@dataclass
class Aggregation:
    """One target's regions at the end of one kernel aggregation."""

    target: int  # index of the target in the kdamond's context
    time_ns: int  # when the kernel reset the aggregation (CLOCK_MONOTONIC)
    start: np.ndarray  # uint64
    end: np.ndarray
    nr_accesses: np.ndarray  # int64
    age: np.ndarray
    probe_hits: np.ndarray  # (nr_probes, regions) int64
    sample_us: int = 0  # the sampling interval in force (0: the configured one)


@dataclass
class _Group:
    target: int
    n: int
    time_ns: int
    last_time: int
    last_end: int
    parts: list[np.ndarray] = field(default_factory=list)
    count: int = 0


class Grouper:
    """Region records in kernel order -> complete aggregations (see the module doc)."""

    def __init__(self, aggr_ns: int, nr_probes: int = 0):
        self.gap_ns = max(1, aggr_ns // 2)
        self.nr_probes = nr_probes
        self.open: dict[int, _Group] = {}
        self.dropped = 0  # aggregations broken by lost records

    def feed(self, recs: np.ndarray) -> list[Aggregation]:
        """``recs``: structured records with time_ns, target, nr_regions, start, end,
        nr_accesses, age and (with probes) probes (nr_probes bytes)."""
        out: list[Aggregation] = []
        if recs.size == 0:
            return out
        # split where a record cannot continue its target's group; runs in between
        # are appended whole (the common case is one run per target per aggregation)
        tgt = recs["target"].astype(np.int64)
        t = recs["time_ns"].astype(np.int64)
        st = recs["start"]
        cut = np.ones(recs.size, dtype=bool)
        if recs.size > 1:
            cut[1:] = ((tgt[1:] != tgt[:-1]) | (st[1:] < recs["end"][:-1])
                       | (t[1:] - t[:-1] > self.gap_ns)
                       | (recs["nr_regions"][1:] != recs["nr_regions"][:-1]))
        starts = np.flatnonzero(cut)
        bounds = np.append(starts, recs.size)
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            self._run(recs[a:b], out)
        return out

    def _run(self, run: np.ndarray, out: list[Aggregation]) -> None:
        first = run[0]
        target, n = int(first["target"]), int(first["nr_regions"])
        t0 = int(first["time_ns"])
        g = self.open.get(target)
        if g is not None and (g.n != n or int(first["start"]) < g.last_end
                              or t0 - g.last_time > self.gap_ns):
            self.dropped += 1  # its tail was lost
            del self.open[target]
            g = None
        while run.size:
            if g is None:
                g = _Group(target, n, t0, t0, 0)
                self.open[target] = g
            take = run[: g.n - g.count]
            g.parts.append(take)
            g.count += take.size
            g.last_time = int(take["time_ns"][-1])
            g.last_end = int(take["end"][-1])
            run = run[take.size:]
            if g.count == g.n:
                out.append(self._close(g))
                del self.open[target]
                g = None
                if run.size:  # more records than nr_regions: the next reset's
                    t0 = int(run[0]["time_ns"])

    def _close(self, g: _Group) -> Aggregation:
        recs = g.parts[0] if len(g.parts) == 1 else np.concatenate(g.parts)
        if self.nr_probes:
            hits = recs["probes"].astype(np.int64).T.reshape(self.nr_probes, -1)
        else:
            hits = np.zeros((0, recs.size), dtype=np.int64)
        return Aggregation(g.target, g.time_ns, recs["start"].astype(np.uint64),
                           recs["end"].astype(np.uint64),
                           recs["nr_accesses"].astype(np.int64), recs["age"].astype(np.int64),
                           hits)

    def flush(self) -> None:
        """The session ends: an open group will never complete."""
        self.dropped += len(self.open)
        self.open.clear()


def record_dtype(nr_probes: int) -> np.dtype:
    fields = [("time_ns", np.int64), ("target", np.int64), ("nr_regions", np.int64),
              ("start", np.uint64), ("end", np.uint64), ("nr_accesses", np.int64),
              ("age", np.int64)]
    if nr_probes:
        fields.append(("probes", np.uint8, (nr_probes,)))
    return np.dtype(fields)


class AggregationTracer:
    """The aggregation tracepoints of one kdamond thread, read through perf rings."""

    def __init__(self, kdamond_pid: int, nr_probes: int = 0, *, pages: int = 256,
                 wakeup_events: int = 1, tune: bool = False):
        self.kdamond_pid = kdamond_pid
        self.nr_probes = nr_probes
        self.pages = pages
        self.wakeup_events = max(1, wakeup_events)
        self.tune = tune
        self.event = REGION_AGGREGATED if nr_probes else AGGREGATED
        self._fds: list[int] = []
        self._ring: Ring | None = None
        self._tune_ring: Ring | None = None
        self._parser: SampleParser | None = None
        self._tune_parser: SampleParser | None = None
        self._probe_off = -1
        self.tunes: list[tuple[int, int]] = []  # (time_ns, new sample_us)

    @property
    def lost(self) -> int:
        return sum(p.lost for p in (self._parser, self._tune_parser) if p is not None)

    def open(self) -> AggregationTracer:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _event_format(self, name: str) -> tuple[int, dict[str, tuple[int, int]]]:
        d = find_event(name)
        if d is None:
            raise RuntimeFailure(f"no {name} tracepoint under {' or '.join(TRACEFS_DIRS)} "
                                 "(CONFIG_TRACING, or tracefs not mounted)")
        with open(os.path.join(d, "id")) as f:
            tp_id = int(f.read().strip())
        with open(os.path.join(d, "format")) as f:
            fmt = read_format(f.read())
        return tp_id, fmt

    def _open_event(self, tp_id: int, pages: int, wakeup: int) -> tuple[int, Ring]:
        attr = PerfEventAttr()
        attr.type = PERF_TYPE_TRACEPOINT
        attr.size = ctypes.sizeof(PerfEventAttr)
        attr.config = tp_id
        attr.sample_period = 1
        attr.sample_type = SAMPLE_TYPE
        attr.flags = ATTR_DISABLED | ATTR_USE_CLOCKID
        attr.wakeup_events = wakeup
        attr.clockid = CLOCK_MONOTONIC
        try:
            fd = perf_event_open(attr, self.kdamond_pid, -1)
        except OSError as e:
            raise RuntimeFailure(f"perf_event_open of the DAMON tracepoints on kdamond pid "
                                 f"{self.kdamond_pid} failed: {e.strerror}") from None
        self._fds.append(fd)
        return fd, Ring(fd, pages)

    def layout(self, fmt: dict[str, tuple[int, int]]) -> None:
        """Set the sample layout from the event's format (field -> offset, size)."""
        need = list(_FIELDS) + (["probe_hits"] if self.nr_probes else [])
        missing = [f for f in need if f not in fmt]
        if missing:
            raise RuntimeFailure(f"{self.event}: its format lacks {', '.join(missing)}")
        raw_fields = {}
        end = 0
        for f in _FIELDS:
            off, size = fmt[f]
            if size not in _FORMATS:
                raise RuntimeFailure(f"{self.event}: field {f} has size {size}")
            raw_fields[f] = (off, _FORMATS[size])
            end = max(end, off + size)
        if self.nr_probes:
            off, size = fmt["probe_hits"]  # __data_loc: u32 (len << 16 | offset)
            raw_fields["probe_loc"] = (off, "<u4")
            end = max(end, off + size)
            # the dynamic array follows the fixed part, which ends 8-byte aligned
            self._probe_off = (end + 7) & ~7
            end = self._probe_off + self.nr_probes
        dt = sample_dtype(SAMPLE_TYPE, raw_size_for(end), raw_fields)
        self._parser = SampleParser(dt)
        self._raw_start = dt.fields["rawsize"][1] + 4

    def _open(self) -> None:
        tp_id, fmt = self._event_format(self.event)
        self.layout(fmt)
        _, self._ring = self._open_event(tp_id, self.pages, self.wakeup_events)
        if self.tune and find_event(INTERVALS_TUNE) is not None:
            tid, tfmt = self._event_format(INTERVALS_TUNE)
            off, size = tfmt["sample_us"]
            tdt = sample_dtype(SAMPLE_TYPE, raw_size_for(off + size),
                               {"sample_us": (off, _FORMATS[size])})
            self._tune_parser = SampleParser(tdt)
            _, self._tune_ring = self._open_event(tid, 1, 1)
        for f in self._fds:
            ioctl(f, PERF_EVENT_IOC_ENABLE)

    def fileno(self) -> int:
        return self._fds[0] if self._fds else -1

    def wait(self, timeout_s: float) -> bool:
        if not self._fds:
            return False
        r, _, _ = select.select([self._fds[0]], [], [], max(0.0, timeout_s))
        return bool(r)

    def read(self) -> np.ndarray:
        """Every region record in the ring (record_dtype), in kernel order."""
        if self._ring is None or self._parser is None:
            return np.zeros(0, dtype=record_dtype(self.nr_probes))
        if self._tune_ring is not None and self._tune_parser is not None:
            t = self._tune_parser.parse(self._tune_ring.take())
            self.tunes.extend(zip(t["time"].tolist(), t["sample_us"].tolist(), strict=True))
        return self.parse(self._ring.take())

    def parse(self, data: bytes) -> np.ndarray:
        assert self._parser is not None
        s = self._parser.parse(data)
        out = np.zeros(s.size, dtype=record_dtype(self.nr_probes))
        if s.size == 0:
            return out
        out["time_ns"] = s["time"]
        for f, to in (("target_id", "target"), ("nr_regions", "nr_regions"), ("start", "start"),
                      ("end", "end"), ("nr_accesses", "nr_accesses"), ("age", "age")):
            out[to] = s[f]
        if self.nr_probes:
            loc = s["probe_loc"].astype(np.int64)
            want = (self.nr_probes << 16) | self._probe_off
            if np.any(loc != want):
                bad = int(loc[loc != want][0])
                raise RuntimeFailure(f"{self.event}: probe_hits at offset {bad & 0xffff} "
                                     f"length {bad >> 16}, expected {self._probe_off} and "
                                     f"{self.nr_probes}")
            raw = np.ascontiguousarray(s).view(np.uint8).reshape(s.size, s.dtype.itemsize)
            a = self._raw_start + self._probe_off
            out["probes"] = raw[:, a: a + self.nr_probes]
        return out

    def sample_us_at(self, time_ns: int, default: int) -> int:
        """The sampling interval in force at ``time_ns`` (auto-tuning changes it)."""
        cur = default
        for t, v in self.tunes:
            if t <= time_ns:
                cur = int(v)
        return cur

    def close(self) -> None:
        for fd in self._fds:
            try:
                ioctl(fd, PERF_EVENT_IOC_DISABLE)
            except OSError:
                pass
        for ring in (self._ring, self._tune_ring):
            if ring is not None:
                ring.close()
        self._ring = self._tune_ring = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
