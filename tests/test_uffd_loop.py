"""The controlled sampling loop (udamon.primitives.uffd_loop): the C extension and the
pure-Python fallback run the same algorithm and must agree with the truth.

A real target writes a known half of its pages all the time and never touches
the other half; wp (on this host) and rwp (in the 7.3 guest) sample both halves
through ``run_window`` with each implementation.  Needs root (injection).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from udamon.primitives import uffd_loop
from udamon.primitives.base import Window
from udamon.primitives.uffd import RwpPrimitive, WpPrimitive, rwp_available, wp_available
from udamon.primitives.uffd_loop import ARMED, HIT, NOT_ARMED, WindowStats, WindowTarget

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SLOW  # noqa: E402

PAGE = 4096
_root = os.geteuid() == 0
_MODES = []
for _cls, _avail in ((WpPrimitive, wp_available), (RwpPrimitive, rwp_available)):
    ok, why = _avail() if _root else (False, "not root")
    _MODES.append(pytest.param(_cls, id=_cls.name,
                               marks=pytest.mark.skipif(not ok, reason=f"{_cls.name}: {why}")))
_IMPLS = [pytest.param(True, id="c", marks=pytest.mark.skipif(
              not uffd_loop.native(), reason="the C loop is not built")),
          pytest.param(False, id="python")]

_TARGET = r"""
import ctypes, mmap, sys, threading, time
n = 64
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(n):
    m[i * 4096] = 1
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), n, flush=True)
quit = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), quit.set()), daemon=True).start()
while not quit.is_set():  # writes the even pages, never the odd ones, until told to exit
    for i in range(0, n, 2):
        m[i * 4096 + 8] = (m[i * 4096 + 8] + 1) % 256
    time.sleep(0.0005)
"""


def _spawn():
    p = subprocess.Popen([sys.executable, "-c", _TARGET], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    base, n = (int(x) for x in p.stdout.readline().split())
    return p, base, n


def _quit(p) -> None:
    p.stdin.write("quit\n")
    p.stdin.flush()


def _run(prim, pid, pages: np.ndarray, *, native: bool, turns: int, sample_ns: int,
         stop_fd: int = -1, pidfd: int = -1):
    t = prim._targets[pid]
    wt = WindowTarget(t.uffd, t.pagemap, pidfd, pages, t.starts, t.ends)
    arm = np.zeros(turns, np.int64)
    scan = np.zeros(turns, np.int64)
    stats = WindowStats()
    fn = uffd_loop.run_window if native else uffd_loop.run_window_py
    nxt, why = fn([wt], prim.mode, time.monotonic_ns(), sample_ns, 0, stop_fd, arm, scan,
                  stats)
    return wt, nxt, why, stats, arm, scan


@pytest.mark.parametrize("native", _IMPLS)
@pytest.mark.parametrize("cls", _MODES)
def test_window_sees_the_written_pages_exactly(cls, native):
    p, base, n = _spawn()
    prim = cls([p.pid], attribute=False)
    try:
        prim.start([p.pid])
        pages = np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE)
        turns = 5
        plan = np.tile(pages, (turns, 1))
        # the target must write every even page within each turn: 30 ms here, 300 ms in
        # the TCG guest (with 30 ms the Python loop once saw an even page not hit there)
        wt, nxt, why, stats, arm, scan = _run(prim, p.pid, plan, native=native, turns=turns,
                                              sample_ns=30_000_000 * SLOW)
        assert (nxt, why) == (turns, uffd_loop.DONE) and stats.turns == turns
        even, odd = wt.state[:, 0::2], wt.state[:, 1::2]
        assert (even == HIT).all(), even
        assert (odd == ARMED).all(), odd
        assert (arm > 0).all() and (scan >= arm).all()
        # a page outside every registered VMA is never armed
        plan2 = plan[:1].copy()
        plan2[0, 1] = np.uint64(PAGE)  # page 1 of the address space: not the target's
        wt2, *_ = _run(prim, p.pid, plan2, native=native, turns=1, sample_ns=10_000_000)
        assert wt2.state[0, 1] == NOT_ARMED and wt2.state[0, 0] == HIT
    finally:
        prim.stop()
        p.kill()
        p.wait()


@pytest.mark.parametrize("native", _IMPLS)
@pytest.mark.parametrize("cls", _MODES)
def test_window_ends_early_on_stop_and_on_exit(cls, native):
    p, base, n = _spawn()
    prim = cls([p.pid], attribute=False)
    stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    pidfd = os.pidfd_open(p.pid)
    try:
        prim.start([p.pid])
        pages = np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE)
        # a stop after 0.15 s ends a window of 100 x 50 ms within its turn
        threading.Timer(0.15, os.eventfd_write, (stop, 1)).start()
        _, nxt, why, _, _, _ = _run(prim, p.pid, np.tile(pages, (100, 1)), native=native,
                                    turns=100, sample_ns=50_000_000, stop_fd=stop)
        assert why == uffd_loop.STOPPED and 1 <= nxt < 100
        os.eventfd_read(stop)
        # so does the target's exit, seen through its pidfd
        threading.Timer(0.15, _quit, (p,)).start()
        wt, nxt, why, _, _, _ = _run(prim, p.pid, np.tile(pages, (100, 1)), native=native,
                                     turns=100, sample_ns=50_000_000, pidfd=pidfd)
        assert why in (uffd_loop.EXITED, uffd_loop.MM_GONE) and nxt < 100
        assert wt.gone in (uffd_loop.EXITED, uffd_loop.MM_GONE)
    finally:
        prim.stop()
        os.close(stop)
        os.close(pidfd)
        p.kill()
        p.wait()


@pytest.mark.parametrize("cls", _MODES)
def test_sample_window_reports_each_accessed_turn_and_region(cls):
    """The primitive's sample_window turns the states into reports, one per accessed
    (turn, region), each timed inside its own sampling interval."""
    p, base, n = _spawn()
    prim = cls([p.pid])
    try:
        prim.start([p.pid])
        pages = np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE)
        turns, sample_ns = 4, 25_000_000
        t0 = time.monotonic_ns()
        reps, nxt = prim.sample_window(Window(t0, sample_ns, {p.pid: np.tile(pages, (turns, 1))}))
        assert nxt == turns
        assert reps.size == turns * n // 2
        k = (reps["time_ns"] - t0) // sample_ns
        assert sorted(np.bincount(k, minlength=turns).tolist()) == [n // 2] * turns
        idx = (reps["addr"] - np.uint64(base)) // np.uint64(PAGE)
        assert set((idx % np.uint64(2)).tolist()) == {0}  # the even pages only
        assert (reps["cpu"] >= 0).mean() >= 0.9 and (reps["tid"] == p.pid).mean() >= 0.9
        if cls is WpPrimitive:
            assert reps["write"].all()
        else:  # the target reads each byte before writing it: rwp sees the read first
            # (unless a turn protected the page between the two: then the write is first)
            assert (~reps["write"]).mean() >= 0.9
    finally:
        prim.stop()
        p.kill()
        p.wait()
