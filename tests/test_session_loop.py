"""The live session loop (core/session.py run_live) with fake primitives: no root, no
kernel features, exact expectations.

An observational fake reports what the test scripts at given times; a controlled fake
plays the primitive's side of the window API (it "sees" an access on the armed page of
chosen regions in chosen turns).  Duration, stop, targets exiting, flushing the last
interval and the failure path are checked against what the test told the fakes.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import udamon
from udamon import Attrs, Monitor
from udamon.core.session import StopFlag, run_live
from udamon.intake.reports import empty
from udamon.primitives.base import Primitive, Window

PAGE = 4096
BASE = 0x10_0000_0000
MS = 1_000_000


class Clock:
    """A fake monotonic clock the observational fake's waits advance."""

    def __init__(self) -> None:
        self.t = 1_000 * MS

    def __call__(self) -> int:
        return self.t


class Observing(Primitive):
    name = "fake-obs"
    kind = "observational"

    def __init__(self, clock: Clock, script: list[tuple[int, int]], exit_at: int | None = None,
                 fail_at: int | None = None):
        """``script``: (time offset ns, region index) of each access, one page each."""
        self.clock, self.t0 = clock, clock.t
        self.script = sorted(script)
        self.exit_at, self.fail_at = exit_at, fail_at
        self.stopped = 0

    def wait(self, timeout_s: float) -> bool:
        self.clock.t += int(min(timeout_s, 0.01) * 1e9)  # 10 ms steps at most
        return False

    def poll(self, now_ns: int) -> np.ndarray:
        if self.fail_at is not None and now_ns - self.t0 >= self.fail_at:
            raise RuntimeError("the primitive broke")
        due = [(t, r) for t, r in self.script if self.t0 + t <= now_ns]
        self.script = self.script[len(due):]
        if not due:
            return empty()
        t = np.asarray([self.t0 + x for x, _ in due])
        a = np.asarray([BASE + r * 16 * PAGE for _, r in due], dtype=np.uint64)
        return udamon.make_reports(time_ns=t, pid=7, addr=a, cpu=0, source="api")

    def exited(self) -> list[int]:
        if self.exit_at is not None and self.clock.t - self.t0 >= self.exit_at:
            return [7]
        return []

    def stop(self) -> None:
        self.stopped += 1


def _monitor(n_regions: int = 4, aggr_ms: int = 100) -> Monitor:
    m = Monitor(Attrs(sample_us=5000, aggr_us=aggr_ms * 1000, min_nr_regions=n_regions,
                      max_nr_regions=n_regions), seed=1)
    m.add_target(7, [(BASE, BASE + n_regions * 16 * PAGE)])
    return m


def test_observational_session_counts_every_scripted_access():
    clock = Clock()
    # region 1 accessed in 3 distinct sampling intervals of the first aggregation
    script = [(2 * MS, 1), (3 * MS, 1), (12 * MS, 1), (51 * MS, 1)]
    prim = Observing(clock, script)
    snaps = []
    res = run_live(_monitor(), prim, snaps.append, duration_ns=300 * MS, clock=clock)
    assert res.reason == "duration" and prim.stopped >= 1
    assert len(snaps) == res.snapshots >= 3
    first = snaps[0]
    i = int(first.start.searchsorted(np.uint64(BASE + 16 * PAGE), side="right")) - 1
    assert first.nr_accesses[i] == 3 and first.nr_accesses.sum() == 3
    assert sum(int(s.nr_accesses.sum()) for s in snaps[1:]) == 0


def test_a_target_that_exits_ends_the_session_with_its_last_interval():
    clock = Clock()
    prim = Observing(clock, [(130 * MS, 2)], exit_at=150 * MS)
    snaps = []
    res = run_live(_monitor(), prim, snaps.append, duration_ns=10_000 * MS, clock=clock)
    assert res.reason == "targets-exited"
    assert sum(int(s.nr_accesses.sum()) for s in snaps) == 1  # its last access is kept


def test_a_stop_flushes_the_running_interval():
    clock = Clock()
    stop = StopFlag()
    prim = Observing(clock, [(20 * MS, 0), (130 * MS, 3)])
    orig = prim.wait

    def wait(timeout_s):  # the operator presses Ctrl-C 150 ms in
        if clock.t - prim.t0 >= 150 * MS:
            stop.set()
        return orig(timeout_s)

    prim.wait = wait
    snaps = []
    res = run_live(_monitor(), prim, snaps.append, stop=stop, clock=clock)
    assert res.reason == "interrupted"
    assert sum(int(s.nr_accesses.sum()) for s in snaps) == 2  # also the one at 130 ms
    assert snaps[-1].aggr_us < 100_000  # the shorter, flushed last interval


def test_a_failing_primitive_is_stopped_and_the_error_propagates():
    clock = Clock()
    prim = Observing(clock, [], fail_at=250 * MS)
    with pytest.raises(RuntimeError, match="broke"):
        run_live(_monitor(), prim, lambda s: None, duration_ns=1000 * MS, clock=clock)
    assert prim.stopped == 1


class Controlled(Primitive):
    """Sees an access on the armed page of the regions in ``hot`` in every turn, and on
    ``warm`` in even turns; exits after ``exit_after`` turns (if set)."""

    name = "fake-ctl"
    kind = "controlled"

    def __init__(self, hot: set[int], warm: set[int], exit_after: int | None = None):
        self.hot, self.warm, self.exit_after = hot, warm, exit_after
        self.turns = 0
        self.armed: list[np.ndarray] = []
        self.stopped = 0
        self.gone = False

    def sample_window(self, window: Window, stop_fd: int = -1) -> tuple[np.ndarray, int]:
        plan = window.plans[7]
        parts = []
        for t in range(window.first, window.turns):
            if self.exit_after is not None and self.turns >= self.exit_after:
                self.gone = True
                return (np.concatenate(parts) if parts else empty()), t
            self.turns += 1
            self.armed.append(plan[t])
            # a real primitive's turn lasts its sampling interval
            end = window.tick0_ns + (t + 1) * window.sample_ns
            time.sleep(max(0, end - time.monotonic_ns()) / 1e9)
            regs = [r for r in range(plan.shape[1])
                    if r in self.hot or (r in self.warm and t % 2 == 0)]
            if regs:
                parts.append(udamon.make_reports(
                    time_ns=window.tick0_ns + t * window.sample_ns + window.sample_ns // 2,
                    pid=7, addr=plan[t][regs], source="api"))
        return (np.concatenate(parts) if parts else empty()), window.turns

    def poll(self, now_ns: int) -> np.ndarray:  # arm()/poll() are not used by sessions
        return empty()

    def exited(self) -> list[int]:
        return [7] if self.gone else []

    def stop(self) -> None:
        self.stopped += 1


def test_controlled_session_counts_turns_per_region():
    mon = _monitor(n_regions=4, aggr_ms=20)  # 4 turns of 5 ms per aggregation
    prim = Controlled(hot={0}, warm={2})
    snaps = []
    res = run_live(mon, prim, snaps.append, duration_ns=60 * MS)
    assert res.reason == "duration" and prim.stopped >= 1 and snaps
    s = snaps[0]
    assert s.nr_accesses.tolist() == [4, 0, 2, 0]  # hot: every turn, warm: every other
    # the core armed one page per region per turn, inside the region
    for plan in prim.armed[:4]:
        assert len(plan) == 4
        assert all(int(s.start[i]) <= int(plan[i]) < int(s.end[i]) for i in range(4))


def test_controlled_session_ends_when_the_target_exits_mid_window():
    mon = _monitor(n_regions=4, aggr_ms=20)
    prim = Controlled(hot={1}, warm=set(), exit_after=6)  # the second window, turn 2
    snaps = []
    res = run_live(mon, prim, snaps.append, duration_ns=10_000 * MS)
    assert res.reason == "targets-exited"
    assert [int(s.nr_accesses[1]) for s in snaps] == [4, 2]  # the cut window is kept


def test_controlled_session_stops_from_another_thread():
    mon = _monitor(n_regions=4, aggr_ms=20)
    prim = Controlled(hot={0}, warm=set())
    stop = StopFlag()
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    res = run_live(mon, prim, lambda s: None, stop=stop)
    assert res.reason == "interrupted" and time.monotonic() - t0 < 5


class StoppedMidTurn(Controlled):
    """Turn 1 of the first window is cut short right after arming (a stop): its report's
    time on the sampling grid lies after the moment the session closes the interval."""

    def __init__(self, stop: StopFlag):
        super().__init__(hot={0}, warm=set())
        self.stop_flag = stop

    def sample_window(self, window: Window, stop_fd: int = -1) -> tuple[np.ndarray, int]:
        plan = window.plans[7]
        reps = []
        for t in (0, 1):
            reps.append(udamon.make_reports(
                time_ns=window.tick0_ns + t * window.sample_ns + window.sample_ns // 2,
                pid=7, addr=plan[t][[0]], source="api"))
            if t == 0:
                time.sleep(window.sample_ns / 1e9)
        self.stop_flag.set()
        return np.concatenate(reps), 2


def test_a_turn_cut_short_by_a_stop_still_counts():
    mon = _monitor(n_regions=4, aggr_ms=20)
    stop = StopFlag()
    snaps = []
    res = run_live(mon, StoppedMidTurn(stop), snaps.append, stop=stop)
    assert res.reason == "interrupted"
    assert [int(x) for x in snaps[0].nr_accesses] == [2, 0, 0, 0]


# -- a regions primitive (the kernel's DAMON) with an observer beside it ----------------


class Supplying(Primitive):
    """The kernel's side: one aggregation every 100 ms over two regions, ready to read
    the moment it ends (the kernel's tracepoint is that fast)."""

    name = "fake-kernel"
    kind = "regions"

    def __init__(self, clock: Clock):
        self.clock, self.t0, self.n = clock, clock.t, 0

    def wait(self, timeout_s: float) -> bool:
        self.clock.t += int(min(timeout_s, 0.01) * 1e9)
        return False

    def aggregations(self):
        from udamon.primitives.base import SuppliedRegions

        out = []
        while self.t0 + (self.n + 1) * 100 * MS <= self.clock.t:
            t1 = self.t0 + (self.n + 1) * 100 * MS
            out.append(SuppliedRegions(7, t1 - 100 * MS, t1, 5000,
                                       np.asarray([BASE, BASE + 32 * PAGE], dtype=np.uint64),
                                       np.asarray([BASE + 32 * PAGE, BASE + 64 * PAGE],
                                                  dtype=np.uint64),
                                       np.asarray([20, 0]), np.asarray([self.n, self.n])))
            self.n += 1
        return out

    def poll(self, now_ns: int) -> np.ndarray:
        return empty()

    def exited(self) -> list[int]:
        return []


class LateObserving(Observing):
    """hint's side: a fault is read 60 ms after it happened (the loop reads rings once
    a turn), so an aggregation supplied at once would miss its interval's last ones."""

    def poll(self, now_ns: int) -> np.ndarray:
        return super().poll(now_ns - 60 * MS)


def test_supplied_aggregations_wait_for_the_observers_reports_of_their_interval():
    clock = Clock()
    # one access in region 0 in each aggregation, 90 ms into it: read 60 ms later
    script = [(k * 100 * MS + 90 * MS, 0) for k in range(5)]
    kernel, hint = Supplying(clock), LateObserving(clock, script)
    m = Monitor(Attrs(sample_us=5000, aggr_us=100_000, min_nr_regions=3, max_nr_regions=10),
                probes=[udamon.Probe.parse("c0=cpus:0")], seed=1)
    m.add_target(7, [(BASE, BASE + 64 * PAGE)])
    snaps = []
    res = run_live(m, [kernel, hint], snaps.append, duration_ns=520 * MS, clock=clock)
    # the held ones come out at the end (one more may end while the last reports come)
    assert res.reason == "duration" and len(snaps) in (5, 6)
    assert all(s.nr_accesses.tolist() == [20, 0] for s in snaps)  # the kernel's counts
    assert [s.probe_hits["c0"].tolist() for s in snaps[:5]] == [[1, 0]] * 5  # each its own
    assert m.stats.late == 0


def _delivered(latency_ns: int | None, script, duration_ms: int = 2_500):
    clock = Clock()
    prim = Observing(clock, script)
    out = []  # (snapshot, the clock when it was handed over)
    res = run_live(_monitor(), prim, lambda s: out.append((s, clock.t)),
                   duration_ns=duration_ms * MS, clock=clock, latency_ns=latency_ns)
    return res, out, clock.t - prim.t0


def test_a_longer_latency_hands_over_the_same_snapshots_later_in_bursts():
    """With latency L the loop closes the due intervals every L (fewer wake-ups with
    cold caches: an idle hint session's cost), and the snapshots are the very same."""
    script = [(2 * MS, 1), (3 * MS, 1), (12 * MS, 1), (151 * MS, 2), (1_230 * MS, 0),
              (2_401 * MS, 3)]
    r0, on_time, end0 = _delivered(0, script)
    r1, late, end1 = _delivered(1_000 * MS, script)
    assert r0.reason == r1.reason == "duration"
    assert len(on_time) == len(late) == 25  # 2.5 s of 100 ms intervals
    for (a, _), (b, _) in zip(on_time, late, strict=True):
        assert (a.time_ns, a.start_ns) == (b.time_ns, b.start_ns)
        assert np.array_equal(a.start, b.start) and np.array_equal(a.end, b.end)
        assert np.array_equal(a.nr_accesses, b.nr_accesses)
        assert np.array_equal(a.age, b.age)
    # six accesses in five sampling intervals (2 and 3 ms share one)
    assert sum(int(s.nr_accesses.sum()) for s, _ in late) == 5
    # latency 0: each interval as it ends; 1 s: the first ten together, 1 s in
    t0 = 1_000 * MS
    assert all(at - (s.time_ns) < 20 * MS for s, at in on_time)
    first_ten = {at for _, at in late[:10]}
    assert len(first_ten) == 1 and first_ten.pop() >= t0 + 1_000 * MS
    assert max(at - s.time_ns for s, at in late) >= 900 * MS
    assert all(at - s.time_ns <= 1_000 * MS + 20 * MS for s, at in late)
    # the duration still ends the session on time, not at the next latency step
    assert end0 == end1 == 2_500 * MS


def test_a_stop_still_ends_a_long_latency_session_at_once():
    clock = Clock()
    stop = StopFlag()
    prim = Observing(clock, [(20 * MS, 0), (130 * MS, 3)])
    orig = prim.wait

    def wait(timeout_s):  # Ctrl-C 150 ms in, with 1 s of latency
        if clock.t - prim.t0 >= 150 * MS:
            stop.set()
        return orig(timeout_s)

    prim.wait = wait
    snaps = []
    res = run_live(_monitor(), prim, snaps.append, stop=stop, clock=clock,
                   latency_ns=1_000 * MS)
    assert res.reason == "interrupted"
    assert clock.t - prim.t0 < 200 * MS  # not at the next latency step
    assert [s.time_ns - s.start_ns for s in snaps] == [100 * MS, snaps[-1].time_ns - 1_100 * MS]
    assert sum(int(s.nr_accesses.sum()) for s in snaps) == 2
