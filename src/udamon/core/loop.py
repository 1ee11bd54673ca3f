"""The monitoring loops: they drive primitives and the monitor, and hand out snapshots.

Two loops: ``run_replay`` is data-driven (time comes from the reports, as fast
as the input can be read); ``iter_live`` (and ``run_live`` over it) follows the
monotonic clock like kdamond_fn: with a controlled primitive, the sampling turns
of each aggregation interval, then closing the interval; with observational
primitives only, sleeping until each interval ends.  Several primitives can run
in one session: at most one controlled one (it drives the turns), any number of
observational ones, whose reports are taken between the turns.  A primitive that runs
a DAMON of its own (the kernel's; kind ``regions``) drives instead: each aggregation
it hands over becomes the monitor's regions.  Both loops end
with a reason for the record's end line and stop every primitive on every path.
``udamon.Session`` assembles a session around them.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from udamon.arrays import keep_freed_memory
from udamon.core.monitor import Monitor, Snapshot
from udamon.errors import InputError
from udamon.primitives.base import Primitive, Window
from udamon.targets.page_nodes import PageNodeLookup

SnapshotSink = Callable[[Snapshot], None]


@dataclass
class SessionResult:
    reason: str
    snapshots: int = 0
    lost_samples: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    end: dict = field(default_factory=dict)  # the primitive's own end-line keys


class StopFlag:
    """Set from a signal handler or another thread to end a session cleanly.

    ``fileno()`` is an eventfd that becomes readable when the flag is set, so a
    primitive sleeping in poll() (the controlled sampling loop) wakes at once."""

    def __init__(self) -> None:
        self._ev = threading.Event()
        self.why = "interrupted"
        self._fd = -1

    def fileno(self) -> int:
        if self._fd < 0:
            self._fd = os.eventfd(1 if self._ev.is_set() else 0,
                                  os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._fd

    def set(self, why: str = "interrupted") -> None:
        self.why = why
        self._ev.set()
        if self._fd >= 0:
            try:
                os.eventfd_write(self._fd, 1)
            except OSError:
                pass

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def is_set(self) -> bool:
        return self._ev.is_set()

    def wait(self, timeout: float) -> bool:
        return self._ev.wait(timeout)


# A time jump that would close more empty aggregation intervals than this is taken
# for a unit mistake (microseconds, seconds, a garbage value): closing them one by one
# would run for hours and write a record of nothing.
MAX_EMPTY_AGGRS = 1_000_000


def iter_replay(monitor: Monitor, chunks, stop: StopFlag | None = None,
                progress: Callable[[int], None] | None = None,
                where: Callable[[int], str] | None = None,
                result: SessionResult | None = None) -> Iterator[Snapshot]:
    """Feed report chunks (sorted by time) and yield each aggregation's snapshots as
    time passes.  The aggregation holding the last report is closed too, so every
    report counts.

    Intervals are closed one at a time and ``stop`` checked in between, so a long
    catch-up can be interrupted.  ``where(i)`` names report ``i`` of the current chunk
    in errors (e.g. ``FILE:LINE``).  A time jump over more than MAX_EMPTY_AGGRS
    aggregation intervals raises InputError after the reports before it were
    counted.  ``result`` (when given) is filled in as the loop runs."""
    res = result if result is not None else SessionResult("input-exhausted")
    res.reason = "input-exhausted"
    last_t: int | None = None
    for chunk in chunks:
        if stop is not None and stop.is_set():
            res.reason = stop.why
            break
        if chunk.size == 0:
            continue
        if monitor.window_start is None:
            monitor.start(int(chunk["time_ns"][0]))
        jump = _find_jump(monitor, chunk, last_t)
        if jump is not None:
            # count what comes before the jump, then refuse (the caller closes the record)
            if jump:
                monitor.report_batch(chunk[:jump])
                last_t = int(chunk["time_ns"][jump - 1])
                yield from _advance(monitor, last_t, stop, res)
            prev = last_t if last_t is not None else monitor.window_start
            _refuse_jump(monitor, int(prev), int(chunk["time_ns"][jump]),
                         where(jump) if where is not None else None)
        monitor.report_batch(chunk)
        last_t = int(chunk["time_ns"][-1])
        yield from _advance(monitor, last_t, stop, res)
        if res.reason != "input-exhausted":
            break
        if progress is not None:
            progress(int(chunk.size))
    if last_t is not None and res.reason == "input-exhausted":
        end = monitor.window_end
        if end is not None and end <= last_t:  # pragma: no cover - advance closed it
            end = last_t + 1
        yield from _advance(monitor, end if end is not None else last_t + 1, stop, res)


def run_replay(monitor: Monitor, chunks, sink: SnapshotSink,
               stop: StopFlag | None = None,
               progress: Callable[[int], None] | None = None,
               where: Callable[[int], str] | None = None) -> SessionResult:
    """``iter_replay`` handing every snapshot to ``sink``; returns how it ended."""
    res = SessionResult("input-exhausted")
    for snap in iter_replay(monitor, chunks, stop, progress, where, res):
        sink(snap)
    return res


def _advance(monitor: Monitor, now_ns: int, stop: StopFlag | None,
             res: SessionResult) -> Iterator[Snapshot]:
    """Close the intervals ending by ``now_ns`` one by one (stopping when ``stop`` is
    set: then ``res.reason`` says why)."""
    while (we := monitor.window_end) is not None and we <= now_ns:
        if stop is not None and stop.is_set():
            res.reason = stop.why
            return
        for s in monitor.advance(we):
            res.snapshots += 1
            yield s


def _find_jump(monitor: Monitor, chunk, last_t: int | None) -> int | None:
    """Index of the first report whose time jumps over too many aggregation intervals."""
    limit = float(MAX_EMPTY_AGGRS) * monitor.attrs.aggr_us * 1000
    t = chunk["time_ns"].astype(np.float64)  # float: int64 differences can overflow
    prev = float(last_t if last_t is not None else monitor.window_start)
    big = np.flatnonzero(np.diff(t, prepend=prev) > limit)
    return int(big[0]) if big.size else None


def _refuse_jump(monitor: Monitor, prev: int, t: int, where: str | None):
    n = (t - prev) // (monitor.attrs.aggr_us * 1000)
    raise InputError(f"{where + ': ' if where else ''}time jumps from {prev} to {t} ns: "
                     f"{n} aggregation intervals without a report (more than "
                     f"{MAX_EMPTY_AGGRS:,}); time_ns must be in nanoseconds")


def iter_live(monitor: Monitor, primitives: Primitive | list[Primitive], *,
              duration_ns: int | None = None, stop: StopFlag | None = None,
              clock: Callable[[], int] = time.monotonic_ns,
              on_tick: Callable[[int], None] | None = None,
              annotate: Callable[[Snapshot], None] | None = None,
              page_nodes: PageNodeLookup | None = None,
              result: SessionResult | None = None,
              latency_ns: int = 0) -> Iterator[Snapshot]:
    """Real-time loop, yielding each snapshot as its aggregation interval closes.  With a
    controlled primitive, each interval is its sampling turns (arm, wait, check); with
    observational ones only, the loop sleeps until intervals are due or a primitive has
    data waiting.  ``latency_ns`` (observational only): how long a finished interval
    may wait to be closed; the due intervals are then closed together, every
    ``latency_ns`` (rounded down to whole intervals; 0: each as it ends).  Reports carry
    their time, so the snapshots are the same; what changes is that the loop wakes once
    per latency instead of once per interval, each time with caches gone cold (most of
    an idle session's cost: bench/analysis.md).  The caller has started the
    primitives; this stops them before it returns, on every path (also when the caller
    stops iterating).  ``page_nodes`` fills each report's ``page_node`` before the
    monitor counts it; ``result`` (when given) is filled in as the loop runs and ends."""
    prims = list(primitives) if isinstance(primitives, list) else [primitives]
    keep_freed_memory()  # the same arrays every aggregation: no page faults for them
    if any(p.kind == "regions" for p in prims):
        yield from _iter_supplied(monitor, prims, duration_ns=duration_ns, stop=stop,
                                  clock=clock, on_tick=on_tick, annotate=annotate,
                                  page_nodes=page_nodes, result=result)
        return
    controlled = [p for p in prims if p.kind == "controlled"]
    if len(controlled) > 1:
        raise ValueError("a session can hold one controlled primitive at most")
    driver = controlled[0] if controlled else None
    observers = [p for p in prims if p is not driver]
    stop = stop or StopFlag()
    res = result if result is not None else SessionResult("duration")
    res.reason = "duration"

    def feed(reports: np.ndarray) -> None:
        if page_nodes is not None:
            page_nodes.annotate(reports)
        monitor.report_batch(reports)

    def take(now: int) -> None:
        for p in observers:
            feed(p.poll(now))

    try:
        t0 = clock()
        monitor.start(t0)
        ran = 0
        delay = max((0, *(int(p.report_delay_ns) for p in observers))) if not driver else 0
        aggr_ns = monitor.attrs.aggr_us * 1000
        ahead_ns = max(0, int(latency_ns) // aggr_ns - 1) * aggr_ns  # whole intervals more
        exit_seen: dict[int, int] = {}  # pid -> when its exit was seen (with a delay)
        lead = observers[0] if observers else None
        # one observer whose wait() also watches the stop flag: one wait per latency;
        # else 0.1 s waits (the other observers are polled, a stop is seen, that often)
        wake_on_stop = (lead is not None and len(observers) == 1
                        and "wake_fd" in inspect.signature(lead.wait).parameters)
        while True:
            if driver is not None:
                # the sampling turns of one aggregation interval, as kdamond_fn runs them:
                # one random page per region per sampling interval, armed and checked
                ran = _sample_window(monitor, driver, stop, clock, feed)
                if stop.is_set():
                    res.reason = stop.why
            else:
                # observational: reports carry their time, so wake when the intervals of
                # the latency are due (plus the primitives' report delay), to take what a
                # primitive has waiting meanwhile, and at the end of the duration
                next_tick = (monitor.window_end or clock()) + ahead_ns + delay
                if duration_ns is not None:
                    next_tick = min(next_tick, t0 + duration_ns)
                while not stop.is_set() and not all(p.exhausted() for p in observers):
                    remaining = (next_tick - clock()) / 1e9
                    if remaining <= 0:
                        break
                    assert lead is not None
                    if (lead.wait(remaining, stop.fileno()) if wake_on_stop
                            else lead.wait(min(remaining, 0.1))) or len(observers) > 1:
                        take(clock())
                if stop.is_set():
                    res.reason = stop.why
            now = clock()
            take(now)
            exits = sorted({pid for p in prims for pid in p.exited()})
            if delay:
                # reports of a target that exited can still be on their way: it ends
                # (its interval closes as its last) once the report delay has passed
                for pid in exits:
                    exit_seen.setdefault(pid, now)
                exits = []
            _mark_exited(monitor, exits)
            # a controlled interval is its turns: closed when they are done, also when a
            # stop or the targets' exit cut them short
            snaps = ((monitor.close(now) if ran else []) if driver is not None
                     else monitor.advance(now - delay))
            for s in snaps:
                if annotate is not None:
                    annotate(s)
                res.snapshots += 1
                yield s
            if snaps and page_nodes is not None:
                page_nodes.new_interval()  # pages may move between intervals
            if exit_seen:
                due = [pid for pid, seen in exit_seen.items() if now - delay >= seen]
                _mark_exited(monitor, due)
                for pid in due:
                    del exit_seen[pid]
            if on_tick is not None:
                on_tick(now - t0)
            if res.reason != "duration":
                break
            if duration_ns is not None and now - t0 >= duration_ns:
                break
            if monitor.targets and all(t.exited for t in monitor.targets):
                res.reason = "targets-exited"
                break
            if observers and driver is None and all(p.exhausted() for p in observers):
                res.reason = "input-exhausted"
                break
        # the running interval holds the exited targets' last accesses, or the ones
        # since the last full interval before an interrupt: close it early (a controlled
        # session has closed its last interval already)
        if driver is None:
            now = clock()
            take(now)
            ws, sample_ns = monitor.window_start, monitor.attrs.sample_us * 1000
            if len(monitor.buffer) and ws is not None and now - ws < sample_ns:
                # flush() closes no interval shorter than a sampling interval: an input
                # that ended right after an interval began still has its reports counted
                time.sleep((ws + sample_ns - now) / 1e9)
                now = clock()
            for s in monitor.flush(now):
                if annotate is not None:
                    annotate(s)
                res.snapshots += 1
                yield s
    finally:
        _stop_all(prims, stop, res)


def _stop_all(prims: list[Primitive], stop: StopFlag, res: SessionResult) -> None:
    """Every path out of a loop: stop the primitives, then gather what they say."""
    for p in prims:
        p.stop()
    stop.close()
    res.lost_samples = 0
    res.notes = []
    res.end = {}
    for p in prims:
        st = p.stats()
        res.lost_samples += st.lost_samples
        res.notes.extend(st.notes)
        res.end.update(st.end)


# how long an aggregation of a regions primitive waits for the observers' reports of
# its interval (their rings are read at every turn of the loop, 0.1 s apart)
SUPPLY_HOLD_NS = 150_000_000


def _drain(driver: Primitive, held: list, hold: int, clock: Callable[[], int],
           take: Callable[[int], None]) -> None:
    """At the end: wait (at most ``hold``) until the observers' reports of every held
    aggregation can have been read, taking them meanwhile."""
    held += driver.aggregations()
    if not held or not hold:
        return
    until = max(int(b.end_ns) for b in held) + hold
    deadline = clock() + hold
    while (now := clock()) < min(until, deadline):
        driver.wait(min(0.05, (min(until, deadline) - now) / 1e9))
        take(clock())


def _iter_supplied(monitor: Monitor, prims: list[Primitive], *, duration_ns: int | None,
                   stop: StopFlag | None, clock: Callable[[], int],
                   on_tick: Callable[[int], None] | None,
                   annotate: Callable[[Snapshot], None] | None,
                   page_nodes: PageNodeLookup | None,
                   result: SessionResult | None) -> Iterator[Snapshot]:
    """A regions primitive (the kernel's DAMON) drives: every aggregation it ends becomes
    the monitor's regions and one snapshot per target (``Monitor.supply``); reports of
    observational primitives in the same list are taken meanwhile and count as probe
    hits over those regions.  With observers, an aggregation is supplied only once
    SUPPLY_HOLD_NS (plus their report delay) have passed since its end, so that their
    reports of its interval have been read (a fault read a moment after the kernel's
    aggregation ended counted into the next one: 16 % of hint's in the guest).  The
    aggregation running when the session ends is the supplier's and unfinished: it is
    not yielded; finished ones still held are."""
    drivers = [p for p in prims if p.kind == "regions"]
    if len(drivers) > 1 or any(p.kind == "controlled" for p in prims):
        raise ValueError("a regions primitive drives a session alone (observers may join)")
    driver = drivers[0]
    observers = [p for p in prims if p is not driver]
    stop = stop or StopFlag()
    res = result if result is not None else SessionResult("duration")
    res.reason = "duration"

    def take(now: int) -> None:
        for p in observers:
            reports = p.poll(now)
            if page_nodes is not None:
                page_nodes.annotate(reports)
            monitor.report_batch(reports)

    hold = (SUPPLY_HOLD_NS + max((0, *(int(p.report_delay_ns) for p in observers)))
            if observers else 0)
    held: list = []

    def ready(now: int, everything: bool = False) -> list:
        nonlocal held
        held += driver.aggregations()
        due = [everything or int(b.end_ns) + hold <= now for b in held]
        out = [b for b, d in zip(held, due, strict=True) if d]
        held = [b for b, d in zip(held, due, strict=True) if not d]
        return out

    try:
        t0 = clock()
        monitor.start(t0)
        while True:
            driver.wait(0.1)
            now = clock()
            take(now)
            done = (stop.is_set() or (duration_ns is not None and now - t0 >= duration_ns)
                    or bool(monitor.targets and all(t.exited for t in monitor.targets))
                    or driver.exhausted())
            if done:  # the observers' last reports of the finished aggregations
                _drain(driver, held, hold, clock, take)
            snaps = monitor.supply(ready(clock(), everything=done))
            for s in snaps:
                if annotate is not None:
                    annotate(s)
                res.snapshots += 1
                yield s
            if snaps and page_nodes is not None:
                page_nodes.new_interval()
            _mark_exited(monitor, sorted({pid for p in prims for pid in p.exited()}))
            if on_tick is not None:
                on_tick(now - t0)
            if stop.is_set():
                res.reason = stop.why
                break
            if duration_ns is not None and now - t0 >= duration_ns:
                break
            if monitor.targets and all(t.exited for t in monitor.targets):
                res.reason = "targets-exited"
                break
            if driver.exhausted():
                res.reason = "input-exhausted"
                break
    finally:
        _stop_all(prims, stop, res)


def run_live(monitor: Monitor, primitive: Primitive | list[Primitive], sink: SnapshotSink, *,
             duration_ns: int | None = None, stop: StopFlag | None = None,
             clock: Callable[[], int] = time.monotonic_ns,
             on_tick: Callable[[int], None] | None = None,
             annotate: Callable[[Snapshot], None] | None = None,
             page_nodes: PageNodeLookup | None = None,
             latency_ns: int = 0) -> SessionResult:
    """``iter_live`` handing every snapshot to ``sink``; returns how the session ended."""
    res = SessionResult("duration")
    for snap in iter_live(monitor, primitive, duration_ns=duration_ns, stop=stop, clock=clock,
                          on_tick=on_tick, annotate=annotate, page_nodes=page_nodes,
                          result=res, latency_ns=latency_ns):
        sink(snap)
    return res


def _sample_window(monitor: Monitor, primitive: Primitive, stop: StopFlag,
                   clock: Callable[[], int],
                   feed: Callable[[np.ndarray], None] | None = None) -> int:
    """Run the current aggregation interval's sampling turns on a controlled primitive
    and feed what it saw to the monitor.  A window that ends early because a target
    exited or exec'd is resumed for the others; a stop ends it.  The turns start now
    (the interval's start on the clock may have passed while the previous one was
    closed) and run back to back; the caller closes the interval when they are done.
    Returns the number of turns run."""
    monitor.begin_window(clock())
    ws = monitor.window_start
    assert ws is not None
    n = monitor.attrs.aggr_samples
    sample_ns = monitor.attrs.sample_us * 1000
    first = 0
    plans = {t.pid: monitor.sampling_plan(t.pid, n) for t in monitor.targets if not t.exited}
    while first < n and plans and not stop.is_set():
        reports, first = primitive.sample_window(Window(ws, sample_ns, plans, first, n),
                                                 stop.fileno())
        (feed or monitor.report_batch)(reports)
        gone = set(primitive.exited())
        for pid in gone & set(plans):
            monitor.target(pid).exited = True
            del plans[pid]
    return first


def _mark_exited(monitor: Monitor, pids) -> None:
    for pid in pids:
        try:
            monitor.target(pid).exited = True
        except KeyError:
            pass
