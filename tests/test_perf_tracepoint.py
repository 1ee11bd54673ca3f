"""FaultTracer against real page faults: NUMA-balancing hint faults of a pinned workload.

Needs root (perf_event_open on the tracepoint, kernel.numa_balancing) and gcc.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from udamon.errors import RuntimeFailure
from udamon.system.perf_tracepoint import (
    FAULT_DTYPE,
    PERF_RECORD_LOST,
    PERF_RECORD_SAMPLE,
    FaultTracer,
    online_cpus,
    page_fault_tracepoint_available,
)
from udamon.system.sysctl_guard import NUMA_BALANCING, SettingsGuard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads.build import BuildError, build  # noqa: E402

_avail, _why = page_fault_tracepoint_available() if os.geteuid() == 0 else (False, "not root")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tracing page faults needs root"),
    pytest.mark.skipif(not _avail, reason=f"page_fault_user tracepoint unavailable: {_why}"),
]
two_cpus = pytest.mark.skipif(not {0, 1} <= set(online_cpus()), reason="needs CPUs 0 and 1 online")
WRITE = np.uint64(2)


@pytest.fixture(scope="module")
def workload_bin():
    try:
        return build("access_pattern")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


@pytest.fixture
def numa_on(tmp_path):
    """kernel.numa_balancing on for the test, put back whatever happens."""
    orig = Path(NUMA_BALANCING).read_text().strip()
    guard = SettingsGuard(state_dir=str(tmp_path / "state"))
    try:
        guard.set(NUMA_BALANCING, str(int(orig) | 1))
        yield
    finally:
        guard.restore()
        if Path(NUMA_BALANCING).read_text().strip() != orig:
            Path(NUMA_BALANCING).write_text(orig)


class Workload:
    def __init__(self, binary: str, *args: str, duration: float = 12.0) -> None:
        self.proc = subprocess.Popen(
            [binary, "--duration", str(duration), *args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())
        assert self.info["event"] == "start"
        self.pid = self.info["pid"]

    def next_line(self) -> dict:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def ranges(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(self.info[k]) for k in "RWSI"}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(timeout=20)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _collect(tracer: FaultTracer, seconds: float, enough=None) -> np.ndarray:
    parts = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tracer.wait(0.2)
        parts.append(tracer.read())
        if enough is not None and enough(np.concatenate(parts)):
            break
    parts.append(tracer.read())
    return np.concatenate(parts)


def _in(a: np.ndarray, r: tuple[int, int]) -> np.ndarray:
    return a[(a["addr"] >= r[0]) & (a["addr"] < r[1])]


def _enough(ranges, tids, n=300):
    """Enough faults on R and W, and on S from each thread (who faults on S first varies)."""

    def pred(a: np.ndarray) -> bool:
        s_tids = _in(a, ranges["S"])["tid"]
        return all(_in(a, ranges[k]).size >= n for k in "RW") and all(
            np.count_nonzero(s_tids == t) >= 20 for t in tids
        )

    return pred


def _check_attribution(a: np.ndarray, info: dict, ranges) -> dict[str, float]:
    rt, wt = info["reader_tid"], info["writer_tid"]
    r, w, s, i = (_in(a, ranges[k]) for k in "RWSI")
    assert r.size >= 50 and w.size >= 50 and s.size >= 50, (r.size, w.size, s.size)
    stats = {
        "R_reader_cpu0": float(np.mean((r["tid"] == rt) & (r["cpu"] == info["reader_cpu"]))),
        "R_reads": float(np.mean((r["error_code"] & WRITE) == 0)),
        "W_writer_cpu1": float(np.mean((w["tid"] == wt) & (w["cpu"] == info["writer_cpu"]))),
        "W_writes": float(np.mean((w["error_code"] & WRITE) != 0)),
    }
    for k, v in stats.items():
        assert v >= 0.95, (k, v, stats)
    assert i.size <= max(2, a.size // 1000), f"idle buffer got {i.size} faults"
    assert {rt, wt} <= set(s["tid"].tolist()), "shared buffer not seen from both threads"
    s_r = s[s["tid"] == rt]
    s_w = s[s["tid"] == wt]
    assert np.mean((s_r["error_code"] & WRITE) == 0) >= 0.95
    assert np.mean((s_w["error_code"] & WRITE) != 0) >= 0.95
    stats.update(R=r.size, W=w.size, S=s.size, I=i.size, total=a.size)
    return stats


def _report(name: str, **kw) -> None:
    print(f"\n[{name}] " + " ".join(f"{k}={v}" for k, v in kw.items()), file=sys.stderr)


# ------------------------------------------------------------------ real faults, no NUMA hints


def test_self_touch_exact():
    """Every first-touch fault of a fresh mapping is seen once, by the touching thread."""
    n = 2000
    m = mmap.mmap(-1, n * mmap.PAGESIZE)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    base = np.frombuffer(m, dtype=np.uint8).ctypes.data
    with FaultTracer([os.getpid()], wakeup_events=1) as t:
        assert t.mode == "per-thread"
        t0 = time.monotonic_ns()
        for off in range(0, n * mmap.PAGESIZE, mmap.PAGESIZE):
            m[off] = 1
        t1 = time.monotonic_ns()
        assert t.wait(1.0)
        a = t.read()
    del base
    a = _in(
        a,
        (
            np.frombuffer(m, dtype=np.uint8).ctypes.data,
            np.frombuffer(m, dtype=np.uint8).ctypes.data + n * mmap.PAGESIZE,
        ),
    )
    assert a.dtype == FAULT_DTYPE
    assert a.size == n
    assert np.unique(a["addr"] // mmap.PAGESIZE).size == n
    assert set(a["tid"].tolist()) == {threading.get_native_id()}
    assert set(a["pid"].tolist()) == {os.getpid()}
    assert np.all((a["error_code"] & WRITE) != 0)
    assert np.all((a["time_ns"] >= t0) & (a["time_ns"] <= t1))  # CLOCK_MONOTONIC
    assert t.lost == 0
    m.close()


@pytest.mark.parametrize("mode", ["per-thread", "system-wide"])
def test_threads_before_and_after_attach(mode):
    """Threads that existed before attach and threads created after it are both seen."""
    n = 300
    results: dict[str, tuple[int, int, int]] = {}
    go = threading.Event()

    def touch(name: str) -> None:
        go.wait()
        m = mmap.mmap(-1, n * mmap.PAGESIZE)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        for off in range(0, n * mmap.PAGESIZE, mmap.PAGESIZE):
            m[off] = 1
        addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
        results[name] = (threading.get_native_id(), addr, addr + n * mmap.PAGESIZE)
        # keep the mapping alive: the address range must not be reused meanwhile
        results[name + "_m"] = m  # type: ignore[assignment]

    early = threading.Thread(target=touch, args=("early",))
    early.start()
    with FaultTracer([os.getpid()], mode=mode) as t:
        late = threading.Thread(target=touch, args=("late",))
        late.start()
        go.set()
        early.join()
        late.join()
        time.sleep(0.05)
        a = t.read()
    for name in ("early", "late"):
        tid, lo, hi = results[name]
        got = _in(a, (lo, hi))
        assert got.size == n, (name, got.size)
        assert set(got["tid"].tolist()) == {tid}
    assert set(a["pid"].tolist()) == {os.getpid()}
    assert t.duplicates_dropped == 0


def test_missing_pid():
    with pytest.raises(RuntimeFailure, match="does not exist"):
        FaultTracer([2**22 + 12345]).open()


def test_close_idempotent():
    t = FaultTracer([os.getpid()])
    t.open()
    t.close()
    t.close()
    with pytest.raises(RuntimeFailure):
        t.open()


# ------------------------------------------------------------------ synthetic ring contents


def _tracer_with_layout() -> FaultTracer:
    t = FaultTracer([100])
    from udamon.system import perf_tracepoint as pt

    fs = pt._Tracefs()
    try:
        _, offsets, end = pt._read_format(fs.locate())
    finally:
        fs.release()  # unmount tracefs again if this mounted it
    t._build_dtype(offsets, end)
    t.mode = "per-thread"
    return t


def _samples(t: FaultTracer, n: int, *, pid=100, tid=100, ident=1, cpu=0) -> np.ndarray:
    recs = np.zeros(n, dtype=t._dtype)
    recs["type"] = PERF_RECORD_SAMPLE
    recs["size"] = t._rec_size
    recs["id"] = ident
    recs["pid"] = pid
    recs["tid"] = tid
    recs["time"] = np.arange(n)
    recs["cpu"] = cpu
    recs["rawsize"] = t._raw_size
    recs["addr"] = np.arange(n) * 4096
    recs["ip"] = 0x400000
    recs["error_code"] = 6
    return recs


def test_parse_slow_path_lost_and_foreign():
    t = _tracer_with_layout()
    t._ids = np.array([1, 2], dtype=np.uint64)
    t._fam_of_id = np.array([0, 1], dtype=np.int64)
    lost = np.array([PERF_RECORD_LOST, 24 << 16, 7, 42], dtype="<u4").tobytes()[:8]
    lost += np.array([7, 42], dtype="<u8").tobytes()
    other = np.array([3, 16 << 16, 0, 0], dtype="<u4").tobytes()  # unknown record: skipped
    data = (
        _samples(t, 3).tobytes()
        + lost
        + other
        + _samples(t, 2, pid=999, tid=999).tobytes()
        + _samples(t, 4, tid=101, ident=2).tobytes()
    )
    recs = t._filter(t._parse(data))
    assert t.lost == 42
    assert recs.size == 7  # 3 + 4; the foreign pid's samples dropped
    assert t.foreign_dropped == 2


def test_dedup_keeps_one_family_per_thread():
    """A thread reached both by inheritance and by its own event is reported once."""
    t = _tracer_with_layout()
    t._ids = np.array([10, 11, 20, 21], dtype=np.uint64)
    t._fam_of_id = np.array([0, 0, 1, 1], dtype=np.int64)
    a = _samples(t, 5, tid=100, ident=10)
    b = _samples(t, 5, tid=101, ident=10)  # inherited from family 0
    c = _samples(t, 5, tid=101, ident=20)  # its own event: duplicates
    recs = t._filter(t._parse(a.tobytes() + b.tobytes() + c.tobytes()))
    assert recs.size == 10
    assert t.duplicates_dropped == 5
    recs = t._filter(t._parse(c.tobytes() + b.tobytes()))  # stays locked on family 0
    assert recs.size == 5 and set(recs["id"].tolist()) == {10}


def test_parse_cost_100k():
    t = _tracer_with_layout()
    data = _samples(t, 100_000).tobytes()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        recs = t._filter(t._parse(data))
        out = np.empty(recs.size, dtype=FAULT_DTYPE)
        for f in FAULT_DTYPE.names:
            out[f] = recs[{"time_ns": "time"}.get(f, f)]
        best = min(best, time.perf_counter() - t0)
    assert out.size == 100_000
    _report("parse", ms_per_100k=round(best * 1e3, 2))
    assert best < 0.5


# ------------------------------------------------------------------ NUMA hint faults of a workload


@two_cpus
@pytest.mark.parametrize("mode", ["per-thread", "system-wide"])
def test_hint_fault_attribution(workload_bin, numa_on, mode):
    wl = Workload(workload_bin, "--reader-cpu", "0", "--writer-cpu", "1")
    try:
        ranges = wl.ranges()
        with FaultTracer([wl.pid], mode=mode) as t:
            t0 = time.monotonic()
            tids = (wl.info["reader_tid"], wl.info["writer_tid"])
            a = _collect(t, 10.0, _enough(ranges, tids))
            dt = time.monotonic() - t0
            lost = t.lost
        assert set(a["pid"].tolist()) <= {wl.pid}
        stats = _check_attribution(a, wl.info, ranges)
        _report(
            f"hint {mode}",
            faults_per_s=round(a.size / dt),
            seconds=round(dt, 2),
            lost=lost,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
        )
    finally:
        rc = wl.stop()
    assert rc == 0, "workload data corrupted"


@two_cpus
def test_hint_faults_threads_spawned_after_attach(workload_bin, numa_on):
    wl = Workload(workload_bin, "--reader-cpu", "0", "--writer-cpu", "1", "--spawn-late")
    try:
        with FaultTracer([wl.pid]) as t:
            before = set(os.listdir(f"/proc/{wl.pid}/task"))
            threads = wl.next_line()
            assert threads["event"] == "threads"
            assert str(threads["reader_tid"]) not in before
            assert str(threads["writer_tid"]) not in before
            info = dict(wl.info, **threads)
            tids = (info["reader_tid"], info["writer_tid"])
            a = _collect(t, 10.0, _enough(wl.ranges(), tids))
        stats = _check_attribution(a, info, wl.ranges())
        _report(
            "hint spawn-late",
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
        )
    finally:
        rc = wl.stop()
    assert rc == 0


@two_cpus
@pytest.mark.parametrize("mode", ["per-thread", "system-wide"])
def test_other_process_faults_not_returned(workload_bin, numa_on, mode):
    a_wl = Workload(workload_bin, "--reader-cpu", "0", "--writer-cpu", "1", "--size", "8")
    b_wl = Workload(workload_bin, "--reader-cpu", "1", "--writer-cpu", "0", "--size", "8")
    try:
        with FaultTracer([a_wl.pid], mode=mode) as ta, FaultTracer([b_wl.pid]) as tb:
            tids = (a_wl.info["reader_tid"], a_wl.info["writer_tid"])
            # both read side by side: on a loaded 2-CPU machine the NUMA scanner's
            # first pass over two busy processes came ~8 s after their start
            enough_a = _enough(a_wl.ranges(), tids, 100)
            pa, pb = [], []
            end = time.monotonic() + 25.0
            while time.monotonic() < end:
                ta.wait(0.2)
                pa.append(ta.read())
                pb.append(tb.read())
                if enough_a(np.concatenate(pa)) and sum(x.size for x in pb):
                    break
            a, b = np.concatenate(pa + [ta.read()]), np.concatenate(pb + [tb.read()])
        assert a.size > 0 and b.size > 0, (a.size, b.size)  # both really faulted
        assert set(a["pid"].tolist()) == {a_wl.pid}
        b_tids = {b_wl.pid, b_wl.info["reader_tid"], b_wl.info["writer_tid"]}
        assert not b_tids & set(a["tid"].tolist())
        assert set(b["pid"].tolist()) == {b_wl.pid}
    finally:
        rc_a, rc_b = a_wl.stop(), b_wl.stop()
    assert rc_a == 0 and rc_b == 0


def test_auto_falls_back_to_system_wide():
    with FaultTracer([os.getpid()], max_events=1) as t:
        assert t.mode == "system-wide"
        assert len(t.filenos()) == len(online_cpus())
    with FaultTracer([os.getpid()]) as t:
        assert t.mode == "per-thread"
        assert len(t.filenos()) == len(online_cpus())  # one ring per CPU (SET_OUTPUT)


def test_target_exits_while_traced(workload_bin):
    wl = Workload(workload_bin, "--size", "1", duration=0.3)
    with FaultTracer([wl.pid]) as t:
        assert wl.stop() == 0
        t.read()
        assert t.read().size == 0
