"""The kernel primitive (src/udamon/primitives/kernel*.py) on the host.

What runs here: who holds DAMON (constructed sysfs trees, and this host's real
boot-time kdamond, which udamon must refuse to touch), the sysfs write sequence
and its teardown on a constructed tree that acts like the kernel's (tests/
kernel_fake.py), including the watchdog's teardown when udamon is SIGKILLed, the
tracepoint parsing on constructed ring bytes in the 7.3 layout, the monitor's
use of supplied regions, and the command line.  The kernel itself (vaddr,
paddr, probes, the tracepoints, SIGKILL) is tested in the Linux 7.3 guest:
tests/test_kernel_guest.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_udamon
from kernel_fake import FakeKernel

from udamon.core.attrs import Attrs, IntervalsGoal
from udamon.core.monitor import Monitor
from udamon.errors import RuntimeFailure, UsageError
from udamon.intake.reports import make
from udamon.primitives.base import SuppliedRegions
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe
from udamon.record.reader import read_record
from udamon.record.writer import RecordWriter, build_header
from udamon.system.kernel_sysfs import (
    ADMIN,
    Kdamond,
    KdamondSpec,
    KernelProbe,
    busy_reason,
    system_ram,
)
from udamon.system.kernel_trace import AggregationTracer, Grouper, read_format, record_dtype
from udamon.system.sysctl_guard import SettingsGuard
from udamon.system.sysctl_watchdog import proc_start_time

# ------------------------------------------------------------------ who holds DAMON


def _tree(tmp_path: Path, states: list[str], pids: list[int] | None = None) -> Path:
    root = tmp_path / "admin"
    kd = root / "kdamonds"
    kd.mkdir(parents=True)
    (kd / "nr_kdamonds").write_text(f"{len(states)}\n")
    for i, st in enumerate(states):
        (kd / str(i)).mkdir()
        (kd / str(i) / "state").write_text(st + "\n")
        (kd / str(i) / "pid").write_text(f"{(pids or [])[i] if pids else -1}\n")
    return root


def test_busy_reason_names_a_running_kdamond_and_its_owner(tmp_path):
    root = _tree(tmp_path, ["off", "on"], [-1, os.getpid()])
    mods, state = tmp_path / "mods", tmp_path / "run"
    mods.mkdir()
    state.mkdir()
    why = busy_reason(str(root), modules=str(mods), state_dir=str(state))
    assert why is not None and "\n" not in why
    assert f"kdamond 1 (pid {os.getpid()}" in why and "not started by udamon" in why
    assert "does not stop, change or read" in why and "EBUSY" in why
    # the same kdamond turned on by a live udamon session (its settings state file)
    entry = {"path": str(root / "kdamonds" / "1" / "state"), "original": "off\n", "value": "on"}
    (state / "settings-1.json").write_text(json.dumps(
        {"version": 2, "pid": os.getpid(), "start_time": proc_start_time(os.getpid()),
         "entries": [entry],
         "mounts": []}))
    why = busy_reason(str(root), modules=str(mods), state_dir=str(state))
    assert f"started by udamon pid {os.getpid()}" in why


def test_busy_reason_names_an_exclusive_module(tmp_path):
    root = _tree(tmp_path, [])
    mods = tmp_path / "mods"
    p = mods / "damon_stat" / "parameters"
    p.mkdir(parents=True)
    (p / "enabled").write_text("Y\n")
    (p / "kdamond_pid").write_text(f"{os.getpid()}\n")
    (mods / "damon_reclaim" / "parameters").mkdir(parents=True)
    (mods / "damon_reclaim" / "parameters" / "enabled").write_text("N\n")
    why = busy_reason(str(root), modules=str(mods), state_dir=str(tmp_path / "none"))
    assert why is not None and "\n" not in why
    assert "DAMON_STAT (damon_stat.enabled=Y" in why and f"kdamond pid {os.getpid()}" in why
    assert "DAMON_RECLAIM" not in why and "exclusive" in why
    (p / "enabled").write_text("N\n")
    assert busy_reason(str(root), modules=str(mods), state_dir=str(tmp_path / "none")) is None


def test_busy_reason_idle_kdamonds_and_missing_interface(tmp_path):
    root = _tree(tmp_path, ["off", "off"])
    why = busy_reason(str(root), modules=str(tmp_path), state_dir=str(tmp_path))
    assert "2 idle kdamond(s)" in why and "wipe their set-up" in why
    why = busy_reason(str(tmp_path / "nothing"), modules=str(tmp_path), state_dir=str(tmp_path))
    assert "no DAMON sysfs interface" in why and "CONFIG_DAMON_SYSFS" in why


def _host_busy() -> str | None:
    return busy_reason() if os.path.exists(ADMIN) else None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (DAMON's sysfs)")
@pytest.mark.skipif(_host_busy() is None, reason="this machine's DAMON is free; the guest "
                    "test test_kernel_guest.py::test_busy_damon_is_refused_and_untouched "
                    "starts a kdamond to be refused by")
def test_host_kernel_primitive_refuses_the_busy_damon():
    """This host boots with a kdamond that is not udamon's: --primitive kernel exits 1
    with one line naming it, and leaves it exactly as it was."""
    kd = Path(ADMIN) / "kdamonds"
    before = {p: (kd / p).read_text() for p in ("nr_kdamonds", "0/state", "0/pid")}
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        r = run_udamon("record", "--primitive", "kernel", "--pid", str(sleeper.pid),
                       "--duration", "1s", "-o", os.devnull)
        r2 = run_udamon("record", "--primitive", "kernel", "--paddr", "--duration", "1s",
                        "-o", os.devnull)
    finally:
        sleeper.kill()
        sleeper.wait()
    for res in (r, r2):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1, res.stderr
        pid = before["0/pid"].strip()
        assert f"kdamond 0 (pid {pid}" in lines[0] and "not started by udamon" in lines[0]
    assert {p: (kd / p).read_text() for p in before} == before


# ------------------------------------------------------------------ sysfs sequence


@pytest.fixture
def fake(tmp_path, monkeypatch):
    k = FakeKernel(tmp_path / "admin").install(monkeypatch)
    k.mods = tmp_path / "mods"
    k.mods.mkdir()
    k.state = tmp_path / "run"
    return k


def _guard(fake) -> SettingsGuard:
    return SettingsGuard(state_dir=str(fake.state), watchdog=False, handle_signals=False)


def _kd(fake, spec: KdamondSpec) -> Kdamond:
    return Kdamond(spec, _guard(fake), root=str(fake.root), modules=str(fake.mods))


def _probe(name: str, conds: str, weight: int = 0) -> KernelProbe:
    return KernelProbe(name, Probe.parse(f"{name}={conds}").filters, weight)


def test_vaddr_sequence_probes_and_teardown_order(fake):
    attrs = Attrs(2000, 40000, 400000, 20, 500)
    spec = KdamondSpec("vaddr", attrs, [(1234, []), (5678, [])],
                       [_probe("a", "anon"), _probe("m", "!memcg:/sys.slice", 3)],
                       calibrate=True)
    k = _kd(fake, spec)
    k.start()
    c = "kdamonds/0/contexts/0"
    assert fake.read("kdamonds/nr_kdamonds") == "1" and fake.read("kdamonds/0/state") == "on"
    assert k.pid == 4242 and k.nr_probes == 3
    assert fake.read(f"{c}/operations") == "vaddr"
    assert fake.read(f"{c}/monitoring_attrs/intervals/sample_us") == "2000"
    assert fake.read(f"{c}/monitoring_attrs/intervals/aggr_us") == "40000"
    assert fake.read(f"{c}/monitoring_attrs/nr_regions/min") == "20"
    assert fake.read(f"{c}/targets/1/pid_target") == "5678"
    p = f"{c}/monitoring_attrs/probes"
    # "anon" as a condition is "reject non-anon": matching N, allow N; "!memcg:X" is
    # "reject memcg X": matching Y, allow N -- the kernel's filter rule is udamon's
    assert [fake.read(f"{p}/0/filters/0/{f}") for f in ("type", "matching", "allow")] == \
        ["anon", "N", "N"]
    assert [fake.read(f"{p}/1/filters/0/{f}") for f in ("type", "matching", "allow", "path")] \
        == ["memcg", "Y", "N", "/sys.slice"]
    assert fake.read(f"{p}/1/weight") == "3" and fake.read(f"{p}/0/weight") == "0"
    assert fake.read(f"{p}/2/filters/nr_filters") == "0"  # the always-hit calibration probe
    assert fake.read(f"{c}/schemes/0/action") == "stat"
    assert fake.read(f"{c}/schemes/0/access_pattern/nr_accesses/max") == str(2**32 - 1)
    # max is written before min (min may not exceed the current max)
    order = [r for r, _ in fake.log]
    assert order.index(f"{c}/monitoring_attrs/nr_regions/max") < \
        order.index(f"{c}/monitoring_attrs/nr_regions/min")
    k.guard.restore()
    # teardown: state off first (the kdamond stops), then nr_kdamonds back
    tail = [(r, v) for r, v in fake.log if r in ("kdamonds/0/state", "kdamonds/nr_kdamonds")]
    assert tail[-2:] == [("kdamonds/0/state", "off"), ("kdamonds/nr_kdamonds", "0")]
    assert not (fake.root / "kdamonds" / "0").exists()


def test_paddr_fvaddr_regions_and_intervals_goal(fake):
    goal = IntervalsGoal(400, 3, 1000, 100000)
    spec = KdamondSpec("paddr", Attrs(5000, 100000, 1000000, 10, 1000, goal),
                       [(None, [(0x200000, 0x400000), (0x100000, 0x180000)])])
    k = _kd(fake, spec)
    k.start()
    c = "kdamonds/0/contexts/0"
    assert fake.read(f"{c}/operations") == "paddr"
    assert fake.read(f"{c}/targets/0/pid_target") == "0"  # untouched for paddr
    assert fake.read(f"{c}/targets/0/regions/0/start") == str(0x100000)
    assert fake.read(f"{c}/targets/0/regions/1/end") == str(0x400000)
    g = f"{c}/monitoring_attrs/intervals/intervals_goal"
    assert [fake.read(f"{g}/{f}") for f in ("access_bp", "aggrs", "min_sample_us",
                                            "max_sample_us")] == ["400", "3", "1000", "100000"]
    assert fake.read(f"{c}/monitoring_attrs/probes/nr_probes") == "0"
    t, regions = k.tried_regions()
    assert [r[:4] for r in regions] == [(0x100000, 0x180000, 0, 3), (0x200000, 0x400000, 1, 3)]
    k.guard.restore()
    assert fake.read("kdamonds/nr_kdamonds") == "0"


def test_fvaddr_names_its_process(fake):
    """fvaddr monitors fixed ranges of a process: the kernel needs its pid as for vaddr
    (without it 'on' is EINVAL, as the guest found)."""
    spec = KdamondSpec("fvaddr", Attrs(5000, 100000, 1000000, 10, 1000),
                       [(1234, [(0x200000, 0x400000)])])
    k = _kd(fake, spec)
    k.start()
    c = "kdamonds/0/contexts/0"
    assert fake.read(f"{c}/operations") == "fvaddr"
    assert fake.read(f"{c}/targets/0/pid_target") == "1234"
    assert fake.read(f"{c}/targets/0/regions/0/start") == str(0x200000)
    k.guard.restore()


@pytest.mark.parametrize("kw, spec_probes, msg", [
    ({"max_probes": 2}, ["a", "b", "c"], "takes at most 2 probes, 3 given"),
    ({"probes": False}, ["a"], "has no probes (monitoring_attrs/probes/nr_probes is missing"),
    ({"weight": False}, ["w"], "probes have no weight"),
    ({"ops": "paddr"}, [], "has no vaddr operations (it has: paddr"),
    ({"on_errno": errno.EINVAL}, [], "refused udamon's kdamond configuration (EINVAL on 'on')"),
    ({"on_errno": errno.EBUSY}, [], "refused to start udamon's kdamond (EBUSY)"),
])
def test_refusals_are_one_line_and_torn_down(tmp_path, monkeypatch, kw, spec_probes, msg):
    fake = FakeKernel(tmp_path / "admin", **kw).install(monkeypatch)
    probes = [_probe(n, "anon", 1 if n == "w" else 0) for n in spec_probes]
    guard = SettingsGuard(state_dir=str(tmp_path / "run"), watchdog=False,
                          handle_signals=False)
    k = Kdamond(KdamondSpec("vaddr", Attrs(), [(1, [])], probes), guard,
                root=str(fake.root), modules=str(tmp_path))
    with pytest.raises((RuntimeFailure, UsageError)) as ei:
        k.start()
    assert msg in str(ei.value) and "\n" not in str(ei.value)
    guard.restore()
    assert fake.read("kdamonds/nr_kdamonds") == "0"
    assert not (fake.root / "kdamonds" / "0").exists()


def test_unknown_probe_filter_type_is_refused_by_the_kernel(fake, monkeypatch):
    # a type udamon knows for the kernel but this kernel does not take (EINVAL on 'type')
    real = fake.write

    def write(path, value):
        if path.endswith("/type") and value.strip() == "memcg":
            raise OSError(errno.EINVAL, "Invalid argument")
        real(path, value)

    monkeypatch.setattr(fake, "write", write)
    k = _kd(fake, KdamondSpec("paddr", Attrs(), [(None, [(0, 1 << 20)])],
                              [_probe("m", "memcg:/a")]))
    with pytest.raises(RuntimeFailure, match="has no 'memcg' probe filter"):
        k.start()
    k.guard.restore()


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}]
    import pytest
    from kernel_fake import FakeKernel
    from udamon.core.attrs import Attrs
    from udamon.system.kernel_sysfs import Kdamond, KdamondSpec
    from udamon.system.sysctl_guard import SettingsGuard
    from pathlib import Path
    mp = pytest.MonkeyPatch()
    fake = FakeKernel(Path({root!r})).install(mp)
    guard = SettingsGuard(state_dir={state!r}, handle_signals=False)  # with its watchdog
    Kdamond(KdamondSpec("vaddr", Attrs(), [(1, [])]), guard, root={root!r},
            modules={mods!r}).start()
    print("on", flush=True)
    time.sleep(600)
""")


def test_sigkill_of_udamon_turns_its_kdamond_off_and_removes_it(tmp_path):
    """The guard's watchdog undoes both writes when udamon dies by SIGKILL: state off
    (only because it still holds udamon's 'on'), then nr_kdamonds back."""
    root, state, mods = tmp_path / "admin", tmp_path / "run", tmp_path / "mods"
    mods.mkdir()
    code = _CHILD.format(tests=str(Path(__file__).parent), root=str(root), state=str(state),
                         mods=str(mods))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "on"
        assert (root / "kdamonds" / "0" / "state").read_text().strip() == "on"
        assert (root / "kdamonds" / "nr_kdamonds").read_text().strip() == "1"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 20
        while (root / "kdamonds" / "nr_kdamonds").read_text().strip() != "0":
            assert time.monotonic() < deadline, "the watchdog did not restore nr_kdamonds"
            time.sleep(0.05)
        # plain files here: the watchdog wrote 'off' before it wrote nr_kdamonds
        assert (root / "kdamonds" / "0" / "state").read_text().strip() == "off"
        assert not list(state.glob("settings-*.json"))
    finally:
        p.kill()
        p.wait()


def test_system_ram_reads_top_level_ranges(tmp_path):
    f = tmp_path / "iomem"
    f.write_text("00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
                 "00100000-3ffdffff : System RAM\n  01000000-01ffffff : Kernel code\n"
                 "fd000000-fdffffff : PCI Bus 0000:00\n")
    assert system_ram(str(f)) == [(0x1000, 0x9fc00), (0x100000, 0x3ffe0000)]
    f.write_text("00000000-00000000 : System RAM\n")
    with pytest.raises(RuntimeFailure, match="root"):
        system_ram(str(f))


# ------------------------------------------------------------------ tracepoint parsing

# Linux 7.3.4's format files (read in the guest), the part udamon uses
FMT_AGG = """
	field:unsigned long target_id;	offset:8;	size:8;	signed:0;
	field:unsigned int nr_regions;	offset:16;	size:4;	signed:0;
	field:unsigned long start;	offset:24;	size:8;	signed:0;
	field:unsigned long end;	offset:32;	size:8;	signed:0;
	field:unsigned int nr_accesses;	offset:40;	size:4;	signed:0;
	field:unsigned int age;	offset:44;	size:4;	signed:0;
"""
FMT_REGION = """
	field:unsigned long target_id;	offset:8;	size:8;	signed:0;
	field:unsigned long start;	offset:16;	size:8;	signed:0;
	field:unsigned long end;	offset:24;	size:8;	signed:0;
	field:unsigned int nr_regions;	offset:32;	size:4;	signed:0;
	field:unsigned int nr_accesses;	offset:36;	size:4;	signed:0;
	field:unsigned int age;	offset:40;	size:4;	signed:0;
	field:__data_loc unsigned char[] probe_hits;	offset:44;	size:4;	signed:0;
"""


def _sample(t: int, raw: bytes) -> bytes:
    """PERF_RECORD_SAMPLE with TIME | RAW, as the kernel lays it out."""
    pad = (-(4 + len(raw))) % 8
    body = struct.pack("<q", t) + struct.pack("<I", len(raw) + pad) + raw + b"\0" * pad
    return struct.pack("<IHH", 9, 0, 8 + len(body)) + body


def _agg_raw(target, n, s, e, acc, age) -> bytes:
    raw = bytearray(52)
    struct.pack_into("<HBBi", raw, 0, 744, 0, 1, 99)
    struct.pack_into("<QI", raw, 8, target, n)
    struct.pack_into("<QQII", raw, 24, s, e, acc, age)
    return bytes(raw)


def _region_raw(target, n, s, e, acc, age, hits) -> bytes:
    raw = bytearray(48 + len(hits))
    struct.pack_into("<HBBi", raw, 0, 745, 0, 1, 99)
    struct.pack_into("<QQQIIII", raw, 8, target, s, e, n, acc, age, (len(hits) << 16) | 48)
    raw[48:] = bytes(hits)
    return bytes(raw)


def test_tracer_parses_the_73_layouts():
    t = AggregationTracer(1, 0)
    t.layout(read_format(FMT_AGG))
    data = _sample(1000, _agg_raw(0, 2, 0x1000, 0x3000, 7, 2)) + \
        _sample(1001, _agg_raw(0, 2, 0x3000, 0x9000, 0, 11))
    r = t.parse(data)
    assert r["time_ns"].tolist() == [1000, 1001] and r["nr_regions"].tolist() == [2, 2]
    assert r["start"].tolist() == [0x1000, 0x3000] and r["end"].tolist() == [0x3000, 0x9000]
    assert r["nr_accesses"].tolist() == [7, 0] and r["age"].tolist() == [2, 11]
    tp = AggregationTracer(1, 3)
    tp.layout(read_format(FMT_REGION))
    r = tp.parse(_sample(5, _region_raw(1, 1, 0x10000, 0x20000, 20, 4, [0, 20, 7])))
    assert r["target"].tolist() == [1] and r["nr_accesses"].tolist() == [20]
    assert r["probes"].tolist() == [[0, 20, 7]]
    # a probe array where the layout says it cannot be is refused, not misread
    bad = bytearray(_region_raw(1, 1, 0, 4096, 0, 0, [1, 2, 3]))
    struct.pack_into("<I", bad, 44, (3 << 16) | 52)
    with pytest.raises(RuntimeFailure, match="probe_hits at offset 52"):
        tp.parse(_sample(6, bytes(bad)))


def _recs(rows, nr_probes=0):
    out = np.zeros(len(rows), dtype=record_dtype(nr_probes))
    for i, row in enumerate(rows):
        t, target, n, s, e, acc = row[:6]
        out[i] = (t, target, n, s, e, acc, 0, *([row[6]] if nr_probes else []))
    return out


def test_grouper_completes_splits_and_drops_broken_aggregations():
    g = Grouper(aggr_ns=100_000_000, nr_probes=1)
    ms = 1_000_000
    a1 = [(1000 * ms, 0, 2, 0, 10, 5, [3]), (1000 * ms + 5, 0, 2, 10, 20, 0, [1]),
          (1000 * ms + 9, 1, 1, 100, 200, 20, [20])]
    out = g.feed(_recs(a1[:2], 1))  # the second target's record arrives in the next read
    assert [(a.target, a.time_ns, a.start.tolist(), a.nr_accesses.tolist(),
             a.probe_hits.tolist()) for a in out] == [(0, 1000 * ms, [0, 10], [5, 0], [[3, 1]])]
    # target 1, then target 0's next aggregation whose first record was lost: dropped
    # when its successor starts (the address goes back); then a complete one
    more = [a1[2], (1100 * ms + 3, 0, 2, 10, 20, 1, [0]),
            (1200 * ms, 0, 2, 0, 10, 2, [0]), (1200 * ms + 1, 0, 2, 10, 20, 3, [0])]
    out = g.feed(_recs(more, 1))
    assert [(a.target, a.time_ns) for a in out] == [(1, 1000 * ms + 9), (0, 1200 * ms)]
    assert g.dropped == 1
    # a group whose tail was lost is dropped when the next aggregation begins, also when
    # the address does not go back (time gap)
    out = g.feed(_recs([(1300 * ms, 0, 2, 0, 10, 0, [0]),
                        (1400 * ms, 0, 2, 10, 20, 0, [0])], 1))
    assert out == [] and g.dropped == 2
    g.flush()
    assert g.dropped == 3


# ------------------------------------------------------------------ supplied regions


def _supplied(pid, t0, t1, start, end, acc, age, **probes):
    return SuppliedRegions(pid, t0, t1, 5000, np.asarray(start, dtype=np.uint64),
                           np.asarray(end, dtype=np.uint64), np.asarray(acc), np.asarray(age),
                           {k: np.asarray(v) for k, v in probes.items()})


def test_monitor_takes_supplied_regions_and_counts_other_reports_over_them(tmp_path):
    """The kernel's regions become the monitor's; udamon's own probes (CPU 1 here: what
    hint or rwp would supply in a several-primitives session) count the reports of the
    aggregation over those regions, mapped onto the supplier's sampling intervals."""
    m = Monitor(Attrs(5000, 100000, 1000000, 3, 100), probes=[Probe.parse("c1=cpus:1")],
                count_written_pages=False)
    m.add_target(7, [(0, 1 << 20)], name="t")
    m.start(0)
    ms = 1_000_000
    # the supplier's aggregation took 200 ms of wall time for its 20 sampling intervals
    reps = [make(time_ns=t * ms, pid=7, addr=a, cpu=c) for t, a, c in
            ((1, 0x1000, 1), (9, 0x1000, 1), (12, 0x1000, 1), (150, 0x80000, 0),
             (199, 0x90000, 1), (250, 0x1000, 1))]
    m.report_batch(np.concatenate(reps))
    snaps = m.supply([_supplied(7, 0, 200 * ms, [0, 0x40000, 0x80000],
                                [0x40000, 0x80000, 1 << 20], [20, 0, 3], [5, 9, 0],
                                anon=[20, 0, 0])])
    (s,) = snaps
    assert s.start.tolist() == [0, 0x40000, 0x80000] and s.nr_accesses.tolist() == [20, 0, 3]
    assert s.age.tolist() == [5, 9, 0] and s.aggr_us == 200_000
    # 1, 9 and 12 ms fall in the supplier's first sampling interval (10 ms each here)
    # except 12 (the second): 2 intervals; 199 ms is CPU 1 in the third region
    assert s.probe_hits["c1"].tolist() == [2, 0, 1] and s.probe_hits["anon"].tolist() == [20, 0, 0]
    assert s.nr_reports == 5 and m.window_start == 200 * ms
    assert len(m.buffer) == 1  # the 250 ms report waits for the next aggregation
    # the snapshot is a valid record line
    w = RecordWriter(str(tmp_path / "r.jsonl"))
    w.write_header(build_header(m.attrs, "kernel", "controlled", [], [
        Probe.parse("c1=cpus:1"), Probe("anon", (Filter("anon", None, False, False),))],
        m.targets))
    w.write_snapshot(s)
    w.close("duration")
    rec = read_record(str(tmp_path / "r.jsonl"))
    assert rec.snapshots[0].probe_hits["anon"].tolist() == [20, 0, 0]


def test_two_aggregations_of_a_target_in_one_batch_are_two_snapshots():
    """The kernel may end two aggregations between two reads (a slow reader): each is a
    snapshot over its own regions, with the reports of its own interval (the guest
    found this: the second's regions got the first's counts, of another length)."""
    m = Monitor(Attrs(5000, 100000, 1000000, 3, 100), probes=[Probe.parse("c1=cpus:1")],
                count_written_pages=False)
    m.add_target(7, [(0, 1 << 20)], name="t")
    m.start(0)
    ms = 1_000_000
    m.report_batch(np.concatenate([make(time_ns=t * ms, pid=7, addr=0x1000, cpu=1)
                                   for t in (5, 150, 250)]))
    first = _supplied(7, 0, 100 * ms, [0, 1 << 19], [1 << 19, 1 << 20], [3, 0], [1, 1])
    second = _supplied(7, 100 * ms, 200 * ms, [0, 0x1000, 1 << 19],
                       [0x1000, 1 << 19, 1 << 20], [4, 1, 0], [0, 2, 2])
    snaps = m.supply([second, first])  # in any order: the supplier's times decide
    assert [s.time_ns for s in snaps] == [100 * ms, 200 * ms]
    assert [s.nr_accesses.tolist() for s in snaps] == [[3, 0], [4, 1, 0]]
    assert [s.probe_hits["c1"].tolist() for s in snaps] == [[1, 0], [0, 1, 0]]
    assert [s.nr_reports for s in snaps] == [1, 1] and len(m.buffer) == 1


def test_monitor_closes_an_exited_target_after_its_last_supplied_snapshot():
    m = Monitor(Attrs(), count_written_pages=False)
    m.add_target(1, [(0, 4096 * 16)])
    m.add_target(2, [(0, 4096 * 16)])
    m.target(2).exited = True
    b = [_supplied(p, 0, 10**8, [0], [4096 * 16], [1], [0]) for p in (1, 2)]
    assert [s.pid for s in m.supply(b)] == [1, 2]
    assert [s.pid for s in m.supply(b)] == [1]  # 2 is closed


# ------------------------------------------------------------------ command line


@pytest.mark.parametrize("args, msg", [
    (["--primitive", "kernel", "--pid", "1", "--cpus", "0"], "has no sample filters"),
    (["--primitive", "kernel", "--pid", "1", "--breakdown", "cpu"], "cannot tell which CPU"),
    (["--primitive", "kernel", "--pid", "1", "--probe", "w=write"], "cannot tell 'write'"),
    (["--primitive", "kernel", "--pid", "1", "--probe", "a=anon,cpus:0"], "cannot tell 'cpus'"),
    (["--primitive", "kernel,wp", "--pid", "1"], "wp samples regions of its own"),
    (["--primitive", "kernel,hint", "--pid", "1", "--filter", "write"],
     "sample filters have nothing to select"),
    (["--primitive", "kernel,hint", "--pid", "1", "--probe", "x=anon,write"],
     "mixes the kernel's probe filters"),
    (["--primitive", "kernel", "--pid", "1", "--kernel-reader", "x"], "invalid choice"),
    (["--primitive", "kernel", "--paddr", "--pid", "1"], "give no --pid"),
    (["--primitive", "kernel"], "(one of them) (or --paddr)"),
    (["--primitive", "hint", "--pid", "1", "--probe", "a=anon"], "evaluated by the kernel"),
    (["--primitive", "hint", "--pid", "1", "--paddr"], "are for --primitive kernel"),
    (["--primitive", "kernel", "--pid", "1", "--probe", "m=memcg"], "needs a value"),
])
def test_kernel_options_bad_usage_is_one_line(args, msg):
    r = run_udamon("record", *args, "-o", os.devnull)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr


def test_replay_refuses_kernel_only_filters(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("time_ns,pid,tid,cpu,addr,size,write\n1,5,5,0,4096,4096,0\n")
    r = run_udamon("record", "--input", str(csv), "--probe", "a=anon", "-o", os.devnull)
    assert r.returncode == 2 and "evaluated by the kernel's DAMON only" in r.stderr
    r = run_udamon("record", "--input", str(csv), "--filter", "memcg:/x", "-o", os.devnull)
    assert r.returncode == 2 and "evaluated by the kernel's DAMON only" in r.stderr


def test_migrate_refuses_the_kernel_primitive():
    r = run_udamon("migrate", "--primitive", "kernel", "--pid", "1", "--dry-run")
    assert r.returncode == 2 and "cannot tell" in r.stderr


def test_the_first_supplied_aggregation_holds_the_reports_since_the_start():
    """hint attaches before the kernel's first aggregation starts: its first faults are
    counted in the first snapshot, which begins at the session's start (not as late
    reports: 10 % of hint's in the guest were)."""
    m = Monitor(Attrs(5000, 100000, 1000000, 3, 100), probes=[Probe.parse("c1=cpus:1")],
                count_written_pages=False)
    m.add_target(7, [(0, 1 << 20)], name="t")
    ms = 1_000_000
    m.start(2 * ms)
    m.report_batch(make(time_ns=1 * ms, pid=7, addr=0x1000, cpu=1))  # before the start
    (s,) = m.supply([_supplied(7, 50 * ms, 150 * ms, [0, 1 << 19], [1 << 19, 1 << 20],
                               [3, 0], [1, 1])])
    assert s.start_ns == 1 * ms and s.nr_reports == 1 and s.probe_hits["c1"].tolist() == [1, 0]
    assert m.stats.late == 0
