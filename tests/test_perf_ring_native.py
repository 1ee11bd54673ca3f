"""The C ring reader (udamon.system._perf_ring) against the numpy path it replaces.

``FaultTracer.read_reports`` must give exactly the reports that ``read()`` and
hint's ``faults_to_reports`` give for the same ring contents: constructed rings
(records that wrap around the ring's end, lost records, foreign pids, a thread
seen through two event families, a full output) under hypothesis, and real
page faults of this process read by two tracers at once.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udamon.intake.reports import REPORT_DTYPE, SOURCE_IDS
from udamon.primitives.hint import faults_to_reports
from udamon.system import perf_tracepoint as pt
from udamon.system.perf_ring import Ring
from udamon.targets.topology import cpu_to_node

pytestmark = pytest.mark.skipif(pt._native is None, reason="the C ring reader is not built")

PAGE = 4096
HINT = SOURCE_IDS["hint"]
NODES = np.array([0, 1, 1, 0], dtype=np.int32)  # a made-up 4-CPU, 2-node machine


def _layout_tracer(pids=(100,), per_thread=True) -> pt.FaultTracer:
    """A tracer with the tracepoint's real sample layout and no events (rings set later)."""
    t = pt.FaultTracer(list(pids))
    fs = pt._Tracefs()
    try:
        _, offsets, end = pt._read_format(fs.locate())
    finally:
        fs.release()
    t._build_dtype(offsets, end)
    t.mode = "per-thread" if per_thread else "system-wide"
    if per_thread:
        t._ids = np.array([10, 11, 20, 21], dtype=np.uint64)
        t._fam_of_id = np.array([0, 0, 1, 1], dtype=np.int64)
    return t


def _fake_ring(data_pages: int) -> Ring:
    r = object.__new__(Ring)
    r.fd = -1
    r.mm = mmap.mmap(-1, (1 + data_pages) * PAGE)
    r._head = ctypes.c_uint64.from_buffer(r.mm, 1024)
    r._tail = ctypes.c_uint64.from_buffer(r.mm, 1032)
    r.data_off, r.data_size = PAGE, data_pages * PAGE
    r.aux, r.aux_size = None, 0
    return r


def _write(r: Ring, start: int, data: bytes) -> None:
    """Put ``data`` in the ring at position ``start`` (wrapping) and publish it."""
    size, off = r.data_size, r.data_off
    pos = start % size
    first = min(len(data), size - pos)
    r.mm[off + pos: off + pos + first] = data[:first]
    if first < len(data):
        r.mm[off: off + len(data) - first] = data[first:]
    r._tail.value = start
    r._head.value = start + len(data)


def _sample(t: pt.FaultTracer, *, pid, tid, ident, cpu, addr, err, time_ns) -> bytes:
    rec = np.zeros(1, dtype=t._dtype)
    rec["type"] = pt.PERF_RECORD_SAMPLE
    rec["size"] = t._rec_size
    rec["id"] = ident
    rec["pid"] = pid
    rec["tid"] = tid
    rec["time"] = time_ns
    rec["cpu"] = cpu
    rec["rawsize"] = t._raw_size
    rec["addr"] = addr
    rec["ip"] = 0x400000
    rec["error_code"] = err
    return rec.tobytes()


def _lost(n: int) -> bytes:
    return (np.array([pt.PERF_RECORD_LOST, 24 << 16], dtype="<u4").tobytes()
            + np.array([7, n], dtype="<u8").tobytes())


def _lost_samples(n: int) -> bytes:
    return np.array([13, 16 << 16], dtype="<u4").tobytes() + np.array([n], dtype="<u8").tobytes()


def _other() -> bytes:
    return np.array([3, 16 << 16, 0, 0], dtype="<u4").tobytes()  # e.g. PERF_RECORD_COMM


def _numpy_reports(t: pt.FaultTracer) -> np.ndarray:
    """What hint made of the same ring before the C reader: read(), then the conversion
    (with the test's CPU-to-node table)."""
    f = t.read()
    out = faults_to_reports(f)
    out["node"] = np.where((f["cpu"] >= 0) & (f["cpu"] < NODES.size),
                           NODES[np.clip(f["cpu"], 0, NODES.size - 1)], -1)
    return out


record = st.one_of(
    st.tuples(st.just("sample"), st.sampled_from([100, 100, 100, 200, 999]),
              st.sampled_from([100, 101, 102]), st.sampled_from([10, 11, 20, 21, 99]),
              st.integers(-1, 5), st.integers(0, 2**48), st.integers(0, 31)),
    st.tuples(st.just("lost"), st.integers(0, 1000)),
    st.tuples(st.just("lost_samples"), st.integers(0, 1000)),
    st.tuples(st.just("other")),
)


def _encode(t: pt.FaultTracer, recs, limit: int) -> bytes:
    """The records, as many as fit in ``limit`` bytes (the kernel publishes whole ones)."""
    out: list[bytes] = []
    used = 0
    for i, r in enumerate(recs):
        if r[0] == "sample":
            _, pid, tid, ident, cpu, addr, err = r
            out.append(_sample(t, pid=pid, tid=tid, ident=ident, cpu=cpu, addr=addr, err=err,
                               time_ns=1000 + i))
        elif r[0] == "lost":
            out.append(_lost(r[1]))
        elif r[0] == "lost_samples":
            out.append(_lost_samples(r[1]))
        else:
            out.append(_other())
        if used + len(out[-1]) > limit:
            out.pop()
            break
        used += len(out[-1])
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.lists(record, max_size=40), min_size=1, max_size=4),
       start=st.integers(0, 3 * PAGE), pids=st.sampled_from([(100,), (100, 200)]),
       per_thread=st.booleans())
def test_same_reports_as_the_numpy_path(batches, start, pids, per_thread):
    """Read after read (the family decisions carry over), both paths agree exactly."""
    a, b = _layout_tracer(pids, per_thread), _layout_tracer(pids, per_thread)
    ra, rb = _fake_ring(1), _fake_ring(1)  # one data page: most batches wrap around
    a._rings, b._rings = [ra], [rb]
    pos = start
    for batch in batches:
        data = _encode(a, batch, PAGE)
        _write(ra, pos, data)
        _write(rb, pos, data)
        got = a.read_reports(REPORT_DTYPE, HINT, NODES)
        want = _numpy_reports(b)
        assert got is not None and got.dtype == REPORT_DTYPE
        assert got.tobytes() == want.tobytes()
        assert ra._tail.value == rb._tail.value == pos + len(data)
        pos += len(data)
    assert a.lost == b.lost
    assert a.foreign_dropped == b.foreign_dropped
    assert a.duplicates_dropped == b.duplicates_dropped


def test_record_split_at_the_ring_end():
    t = _layout_tracer()
    r = _fake_ring(1)
    t._rings = [r]
    one = _sample(t, pid=100, tid=100, ident=10, cpu=2, addr=0x7f0000001234, err=6,
                  time_ns=5)
    start = PAGE - len(one) // 2  # the record's second half is at the ring's start
    _write(r, start, one)
    got = t.read_reports(REPORT_DTYPE, HINT, NODES)
    assert got.size == 1
    g = got[0]
    assert (int(g["time_ns"]), int(g["pid"]), int(g["tid"]), int(g["cpu"]), int(g["node"]),
            int(g["addr"]), int(g["size"]), bool(g["write"]), int(g["source"]),
            int(g["page_node"])) == (5, 100, 100, 2, 1, 0x7f0000001000, PAGE, True, HINT, -1)
    assert r._tail.value == start + len(one)


def test_incomplete_record_stays_in_the_ring():
    t = _layout_tracer()
    r = _fake_ring(1)
    t._rings = [r]
    one = _sample(t, pid=100, tid=100, ident=10, cpu=0, addr=PAGE, err=0, time_ns=1)
    _write(r, 0, one + one[:16])  # the second record is not all there yet
    assert t.read_reports(REPORT_DTYPE, HINT, NODES).size == 1
    assert r._tail.value == len(one)


def test_live_faults_same_as_read():
    """Two tracers on this process see the same first-touch faults: one read by the C
    reader, one by read() and the conversion; every fault is there once, on its page."""
    n = 3000
    m = mmap.mmap(-1, n * PAGE)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    base = np.frombuffer(m, dtype=np.uint8).ctypes.data
    if os.geteuid() != 0:
        pytest.skip("tracing page faults needs root")
    ok, why = pt.page_fault_tracepoint_available()
    if not ok:
        pytest.skip(why)
    with pt.FaultTracer([os.getpid()], wakeup_events=1) as a, \
            pt.FaultTracer([os.getpid()], wakeup_events=1) as b:
        t0 = time.monotonic_ns()
        for off in range(0, n * PAGE, PAGE):
            m[off] = 1
        t1 = time.monotonic_ns()
        time.sleep(0.05)
        got = a.read_reports(REPORT_DTYPE, HINT, cpu_to_node())
        f = b.read()
    want = faults_to_reports(f)
    assert got is not None
    inside = (got["addr"] >= base) & (got["addr"] < base + n * PAGE)
    mine = got[inside]
    assert mine.size == n
    assert np.array_equal(np.sort(mine["addr"]), base + PAGE * np.arange(n, dtype=np.uint64))
    assert set(mine["tid"].tolist()) == {threading.get_native_id()}
    assert mine["write"].all() and (mine["source"] == HINT).all()
    # the same faults of the buffer (the tracers' other faults differ: b opened after a),
    # time aside: each event stamps its own sample (a preemption between the two events
    # of one fault can part them by milliseconds), but both readers' stamps lie inside
    # the touching loop and follow the order of the touches
    want = want[(want["addr"] >= base) & (want["addr"] < base + n * PAGE)]
    mine, want = np.sort(mine, order="addr"), np.sort(want, order="addr")
    for r in (mine, want):
        assert r["time_ns"].min() >= t0 and r["time_ns"].max() <= t1
        assert (np.diff(r["time_ns"]) >= 0).all()
    mine["time_ns"] = want["time_ns"] = 0
    assert mine.tobytes() == want.tobytes()
    m.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="hint changes kernel.numa_balancing: root")
def test_hint_session_without_the_ring_reader_says_so_and_records_the_same(tmp_path, udamon):
    """UDAMON_PURE_PYTHON=1 (an install without the extensions): hint names the ring
    reader in its one-line notice, and both paths record this process's faults of a
    workload alike (every first touch of 4000 pages, as writes)."""
    ok, why = pt.page_fault_tracepoint_available()
    if not ok:
        pytest.skip(why)
    import json
    import subprocess
    import sys

    code = ("import mmap,sys,time\nsys.stdout.write('go\\n'); sys.stdout.flush()\n"
            "sys.stdin.readline()\nm = mmap.mmap(-1, 4000 * 4096)\n"
            "m.madvise(mmap.MADV_NOHUGEPAGE)\n"
            "[m.__setitem__(o, 1) for o in range(0, 4000 * 4096, 4096)]\n"
            "print(hex(__import__('ctypes').addressof(__import__('ctypes').c_char"
            ".from_buffer(m))), flush=True)\ntime.sleep(60)\n")
    got = {}
    for pure in ("1", "0"):
        wl = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
        try:
            assert wl.stdout.readline().strip() == "go"
            out = tmp_path / f"r{pure}.jsonl"
            rec = subprocess.Popen(
                [sys.executable, "-m", "udamon", "record", "--primitive", "hint", "--pid",
                 str(wl.pid), "--duration", "3s", "-q", "--keep-reports",
                 str(tmp_path / f"k{pure}.csv.gz"), "-o", str(out)],
                env={**os.environ, "UDAMON_PURE_PYTHON": pure}, stderr=subprocess.PIPE,
                text=True)
            # attached once the record's header is written (the tracer is open by then)
            deadline = time.monotonic() + 30
            while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            wl.stdin.write("\n")
            wl.stdin.flush()
            base = int(wl.stdout.readline(), 16)
            _, err = rec.communicate(timeout=60)
            assert rec.returncode == 0, err
        finally:
            wl.kill()
            wl.wait()
        notes = [x for x in err.splitlines() if "without the C extension" in x]
        if pure == "1":
            assert len(notes) == 1 and "_perf_ring" in notes[0], err
        else:
            assert notes == [], err
        assert json.loads(out.read_text().splitlines()[-1]).get("lost_samples", 0) == 0
        got[pure] = _buffer_faults(tmp_path / f"k{pure}.csv.gz", base)
    for pure in ("1", "0"):  # every page once, a write, by the workload's one thread
        pages, writes, tids = got[pure]
        assert pages == list(range(4000)), pure
        assert writes and len(tids) == 1, (pure, tids)


def _buffer_faults(path, base: int):
    """(sorted page offsets, all writes?, thread ids) of the kept reports in the buffer."""
    import gzip

    rows = [x.split(",") for x in gzip.open(path, "rt").read().splitlines()
            if x and not x.startswith("#")]
    cols = rows[0]
    a, w, t = cols.index("addr"), cols.index("write"), cols.index("tid")
    mine = [r for r in rows[1:] if base <= int(r[a], 0) < base + 4000 * 4096]
    return (sorted((int(r[a], 0) - base) // 4096 for r in mine),
            all(r[w] in ("1", "true", "True") for r in mine), {r[t] for r in mine})
