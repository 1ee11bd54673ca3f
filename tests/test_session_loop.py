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
