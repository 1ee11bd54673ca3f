"""The process freezer (targets/freeze.py) and why wp needs it, on real processes.

Needs root (ptrace).  The regression test at the end hammers wp's VMA
registration against a target that maps, grows and unmaps memory in a tight
loop: registering a stale range from /proc/<pid>/maps would split one of the
target's VMAs and make its mremap() fail with EFAULT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from udamon.primitives.uffd import WpPrimitive, wp_available
from udamon.targets import freeze
from udamon.targets.freeze import FreezeFailed, Freezer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads.build import BuildError, build  # noqa: E402

_root = os.geteuid() == 0
needs_root = pytest.mark.skipif(not _root, reason="needs root (ptrace)")
_avail, _why = wp_available() if _root else (False, "not root")
needs_wp = pytest.mark.skipif(not _avail, reason=f"wp unavailable: {_why}")


@pytest.fixture(scope="module")
def torture():
    try:
        return build("wp_torture")
    except BuildError as e:
        pytest.skip(f"cannot build wp_torture: {e}")


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (state, TracerPid)"""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{t}/status") as f:
                tracer = int(next(x for x in f if x.startswith("TracerPid:")).split()[1])
        except (OSError, StopIteration):
            continue
        out[int(t)] = (state, tracer)
    return out


_SPINNERS = textwrap.dedent("""
    import os, signal, sys, threading, time
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    counts = [0] * 4
    def spin(i):
        while True:
            counts[i] += 1
    for i in range(4):
        threading.Thread(target=spin, args=(i,), daemon=True).start()
    print("ready", flush=True)
    while not got:
        time.sleep(0.001)
    print("usr1", sum(counts), flush=True)
    time.sleep(0.2)
""")


@needs_root
def test_freeze_holds_every_thread_and_passes_signals_on():
    p = subprocess.Popen([sys.executable, "-c", _SPINNERS], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with Freezer(p.pid) as fz:
            inside = _threads(p.pid)
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(0.2)
            still = _threads(p.pid)
            assert p.poll() is None
        assert len(inside) == 5  # main + 4 spinners
        assert {s for s, _ in inside.values()} == {"t"}, inside
        assert {tr for _, tr in inside.values()} == {os.getpid()}
        assert {s for s, _ in still.values()} == {"t"}  # the signal did not run it
        assert fz.elapsed_s > 0.2
        # released: the held-back SIGUSR1 reaches its handler, nobody stays traced
        line = p.stdout.readline()
        assert line.startswith("usr1"), line
        after = _threads(p.pid)
        assert "t" not in {s for s, _ in after.values()}
        assert {tr for _, tr in after.values()} == {0}
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()


@needs_root
def test_freeze_of_a_stopped_process_leaves_it_stopped():
    p = subprocess.Popen([sys.executable, "-c", _SPINNERS], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while {s for s, _ in _threads(p.pid).values()} != {"T"}:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with Freezer(p.pid):
            pass
        time.sleep(0.1)
        after = _threads(p.pid)
        assert {s for s, _ in after.values()} == {"T"}
        assert {tr for _, tr in after.values()} == {0}
        os.kill(p.pid, signal.SIGCONT)
        os.kill(p.pid, signal.SIGUSR1)
        assert p.stdout.readline().startswith("usr1")
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()


@needs_root
def _wait_vfork_child(pid: int, timeout: float = 10) -> None:
    """Until the main thread has a child (it is then blocked in vfork() until the
    child exits): a fixed sleep was not enough on a loaded machine."""
    deadline = time.monotonic() + timeout
    path = f"/proc/{pid}/task/{pid}/children"
    while True:
        with open(path) as f:
            if f.read().strip():
                return
        assert time.monotonic() < deadline, "the workload never vforked"
        time.sleep(0.01)


def test_freeze_times_out_on_a_vfork_parent_and_releases_everyone(torture):
    p = subprocess.Popen([torture, "vfork", "1500"], stdout=subprocess.PIPE, text=True)
    try:
        start = json.loads(p.stdout.readline())
        _wait_vfork_child(start["pid"])  # the main thread is in vfork() now
        t0 = time.monotonic()
        with pytest.raises(FreezeFailed, match="did not stop"), Freezer(start["pid"], 0.1):
            pass
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.05)
        threads = _threads(start["pid"])
        spinner = [tid for tid in threads if tid != start["pid"]]
        assert spinner and threads[spinner[0]] == ("R", 0)  # released at once
        assert freeze._STRAGGLERS == {start["pid"]}
        # the vfork child exits after 1.5 s; the parent reaches its stop and is let go
        deadline = time.monotonic() + 10
        while freeze.release_stragglers():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        end = json.loads(p.stdout.readline())
        assert end["event"] == "end"
        assert p.wait(10) == 0
    finally:
        p.kill()
        p.wait()


@needs_wp
def test_wp_registration_never_splits_a_mapping_under_churn(torture):
    """Registering VMAs while the target maps/grows/unmaps memory nonstop: its
    mremap() must never fail (it did with ranges registered outside a freeze)."""
    p = subprocess.Popen([torture, "remap", "3", "64"], stdout=subprocess.PIPE, text=True)
    w = None
    try:
        start = json.loads(p.stdout.readline())
        w = WpPrimitive([start["pid"]], attribute=False)
        w.start()
        t = w._targets[start["pid"]]
        refreshes = 0
        while p.poll() is None and not t.gone:
            t.registered.clear()  # register every mapping again: many chances to race
            w._refresh(t, time.monotonic())
            refreshes += 1
        end = json.loads(p.stdout.readline())
        rc = p.wait(10)
    finally:
        if w is not None:
            w.stop()
        p.kill()
        p.wait()
    assert refreshes > 100
    assert w.freezes > 50
    assert end["rounds"] > 1000
    assert end["failures"] == 0, end
    assert rc == 0
