"""The DAMON engine over reports: counting, filters, probes, adjustment, tuning,
intake limits, and following a real process's memory map."""

import subprocess
import sys
import time

import numpy as np
import pytest

import udamon
from udamon import Attrs, IntervalsGoal, Monitor, Probe, parse_conditions
from udamon.core.session import run_replay
from udamon.primitives.synthetic import Stream, generate
from udamon.targets.procmaps import vaddr_provider

MS = 1_000_000
PAGE = 4096
BASE = 0x10_0000_0000


def region_at(snap, addr):
    i = int(np.searchsorted(snap.start, np.uint64(addr), side="right")) - 1
    assert snap.start[i] <= addr < snap.end[i]
    return i


def test_reports_land_in_the_right_region_and_interval():
    mon = Monitor(Attrs(sample_us=5000, aggr_us=100_000, min_nr_regions=4,
                        max_nr_regions=4), seed=1)
    mon.add_target(10, [(BASE, BASE + 16 * PAGE)])
    mon.start(0)
    # Region 0 is hit in sampling intervals 0, 1 and 1 again (counted once), region 3 in
    # interval 19; one report is outside every region, one belongs to another pid.
    mon.report_access(pid=10, addr=BASE, time_ns=1 * MS)
    mon.report_access(pid=10, addr=BASE + PAGE, time_ns=6 * MS)
    mon.report_access(pid=10, addr=BASE + 2 * PAGE, time_ns=7 * MS)
    mon.report_access(pid=10, addr=BASE + 15 * PAGE, time_ns=99 * MS)
    mon.report_access(pid=10, addr=BASE + 99 * PAGE, time_ns=50 * MS)
    mon.report_access(pid=11, addr=BASE, time_ns=50 * MS)
    mon.report_access(pid=10, addr=BASE + 15 * PAGE, time_ns=100 * MS)  # next aggregation
    snaps = mon.advance(100 * MS)
    assert len(snaps) == 1
    s = snaps[0]
    assert s.start.tolist() == [BASE + i * 4 * PAGE for i in range(4)]
    assert s.nr_accesses.tolist() == [2, 0, 0, 1]
    assert s.nr_reports == 5 and s.nr_passed == 4
    st = mon.stats
    assert (st.outside, st.unmatched) == (1, 1)
    # the report at t=100ms belongs to the second aggregation
    s2 = mon.advance(200 * MS)[0]
    assert s2.nr_accesses[region_at(s2, BASE + 15 * PAGE)] == 1
    assert s2.nr_accesses.sum() == 1


def test_sample_filters_and_probes_count_separately():
    mon = Monitor(Attrs(min_nr_regions=3, max_nr_regions=3),
                  filters=parse_conditions("cpus:0,write"),
                  probes=[Probe.parse("reads=read"), Probe.parse("cpu1=cpus:1")], seed=1)
    mon.add_target(1, [(BASE, BASE + 3 * PAGE)])
    mon.start(0)
    t = np.arange(20) * 5 * MS + 1
    # page 0: CPU 0 writes every interval; page 1: CPU 1 writes; page 2: CPU 0 reads
    for page, cpu, write in ((0, 0, True), (1, 1, True), (2, 0, False)):
        mon.report_batch(udamon.make_reports(time_ns=t, pid=1, addr=BASE + page * PAGE,
                                             cpu=cpu, write=write))
    s = mon.advance(100 * MS)[0]
    assert s.nr_accesses.tolist() == [20, 0, 0]  # only CPU 0's writes pass the sample filters
    assert s.probe_hits["reads"].tolist() == [0, 0, 20]
    assert s.probe_hits["cpu1"].tolist() == [0, 20, 0]


def test_hot_and_cold_buffers_are_told_apart_and_regions_stay_in_bounds():
    hot, cold = BASE, BASE + 64 * 2**20
    streams = [Stream(7, 70, 0, hot, 8 * 2**20, 200_000),
               Stream(7, 71, 1, cold, 8 * 2**20, 20, 0.0)]
    reports = generate(streams, 3_000 * MS, seed=3)
    mon = Monitor(Attrs(min_nr_regions=10, max_nr_regions=40), seed=2)
    mon.add_target(7, [(hot, hot + 8 * 2**20), (cold, cold + 8 * 2**20)])
    snaps = []
    run_replay(mon, [reports[i:i + 10_000] for i in range(0, reports.size, 10_000)],
               snaps.append)
    assert len(snaps) == 30
    for s in snaps:
        assert 1 <= len(s.start) <= 40
        assert np.all(s.start < s.end) and np.all(s.end[:-1] <= s.start[1:])
        assert int((s.end - s.start).sum()) == 16 * 2**20
    last = snaps[-1]
    in_hot = last.start < np.uint64(hot + 8 * 2**20)
    sz = (last.end - last.start).astype(float)
    hot_mean = np.average(last.nr_accesses[in_hot], weights=sz[in_hot])
    assert hot_mean >= 18  # hot: hit in nearly every interval (size-weighted)
    assert last.nr_accesses[in_hot].min() > last.nr_accesses[~in_hot].max()
    assert last.nr_accesses[~in_hot].max() <= 3  # cold: rarely
    # the cold buffer's regions have aged while hot ones stay hot
    assert last.age[~in_hot].max() >= 5


def test_min_and_max_nr_regions_hold_under_noise():
    rng = np.random.default_rng(5)
    n = 400_000
    reports = udamon.make_reports(time_ns=np.sort(rng.integers(0, 2_000 * MS, n)), pid=3,
                                  addr=BASE + rng.integers(0, 2**26, n).astype(np.uint64))
    mon = Monitor(Attrs(min_nr_regions=20, max_nr_regions=60), seed=4)
    mon.add_target(3, [(BASE, BASE + 2**26)])
    snaps = []
    run_replay(mon, [reports], snaps.append)
    counts = [len(s.start) for s in snaps]
    assert max(counts) <= 60
    # regions never merge past total/min_nr_regions, so at least min_nr_regions remain
    assert min(counts) >= 20


def test_interval_tuning_moves_toward_the_goal():
    goal = IntervalsGoal(access_bp=400, aggrs=1, min_sample_us=1000, max_sample_us=100_000)
    # Almost everything is accessed all the time: far above a 4% goal -> intervals shrink.
    busy = Monitor(Attrs(intervals_goal=goal), seed=1)
    busy.add_target(1, [(BASE, BASE + 64 * PAGE)])
    busy.start(0)
    t = np.arange(0, 100 * MS, MS // 2)
    busy.report_batch(udamon.make_reports(time_ns=np.repeat(t, 64), pid=1,
                                          addr=np.tile(BASE + np.arange(64) * PAGE, t.size)))
    busy.advance(100 * MS)
    assert busy.attrs.sample_us < 5000
    assert busy.attrs.aggr_us == busy.attrs.sample_us * 20
    # Nothing accessed: below the goal -> intervals grow (toward max_sample_us).
    idle = Monitor(Attrs(intervals_goal=goal), seed=1)
    idle.add_target(1, [(BASE, BASE + 64 * PAGE)])
    idle.start(0)
    idle.advance(100 * MS)
    assert idle.attrs.sample_us > 5000


def test_bounded_intake_counts_what_it_drops():
    mon = Monitor(buffer_capacity=1000)
    mon.add_target(1, [(BASE, BASE + PAGE)])
    batch = udamon.make_reports(time_ns=np.arange(1500), pid=1, addr=BASE)
    assert mon.report_batch(batch) == 1000
    assert mon.stats.dropped == 500
    assert not mon.report_access(pid=1, addr=BASE, time_ns=2000)
    assert mon.stats.dropped == 501
    mon.advance(200 * MS)  # drains the buffer
    assert mon.report_access(pid=1, addr=BASE, time_ns=200 * MS + 1)


def test_batch_must_have_the_report_dtype():
    mon = Monitor()
    with pytest.raises(TypeError, match="REPORT_DTYPE"):
        mon.report_batch(np.zeros(3))


def test_nodes_are_filled_from_cpus():
    mon = Monitor(filters=parse_conditions("nodes:0"))
    mon.add_target(1, [(BASE, BASE + PAGE * 3)])
    mon.start(0)
    mon.report_access(pid=1, addr=BASE, time_ns=1, cpu=0)  # node unknown: derived from cpu 0
    mon.report_access(pid=1, addr=BASE, time_ns=1, cpu=-1)  # unknown cpu: no node
    s = mon.advance(100 * MS)[0]
    assert s.nr_passed == 1


def test_controlled_sampling_addresses_are_one_page_per_region():
    mon = Monitor(Attrs(min_nr_regions=5, max_nr_regions=5), seed=9)
    mon.add_target(1, [(BASE, BASE + 100 * PAGE)])
    addrs = mon.sampling_addresses(1)
    r = mon.target(1).regions
    assert addrs.size == len(r)
    assert np.all((addrs >= r.start) & (addrs < r.end)) and np.all(addrs % PAGE == 0)


WORKLOAD = r"""
import mmap, sys, time
print("ready", flush=True)
sys.stdin.readline()
m = mmap.mmap(-1, 64 << 20)
m[0] = 1
print("mapped", flush=True)
sys.stdin.readline()
m.close()
print("unmapped", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def mapping_process():
    """A python process running WORKLOAD, ready for its first command; killed after."""
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        p.kill()
        p.wait()


def test_follows_a_real_process_memory_map(mapping_process):
    """Regions come from /proc/pid/maps and follow mmap/munmap every update interval."""
    p = mapping_process
    mon = Monitor(Attrs(aggr_us=100_000, update_us=100_000), seed=1)
    t = mon.add_target(p.pid, provider=vaddr_provider(p.pid))
    assert t.name == "python3" or t.name.startswith("python")
    before = t.regions.total_size()
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "mapped"
    mon.start(0)
    mon.advance(100 * MS)  # closes an aggregation and, update interval passed, re-reads maps
    grown = t.regions.total_size()
    assert grown >= before + (64 << 20) or len(t.ranges) == 3
    t.regions.check_invariants()
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "unmapped"
    mon.advance(200 * MS)
    t.regions.check_invariants()
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(10)
    deadline = time.time() + 5
    while not t.exited and time.time() < deadline:
        mon.advance(mon.window_end)
    assert t.exited  # a vanished target is marked exited, not an exception


def test_missing_process_is_a_clear_error():
    from udamon.errors import TargetGone
    with pytest.raises(TargetGone, match="does not exist"):
        Monitor().add_target(2**22 + 12345, provider=vaddr_provider(2**22 + 12345))


def test_written_pages_count_distinct_pages_and_add_up_when_regions_merge():
    """A dirty rate needs distinct written pages, not intervals with a write: 3 writes
    to one page and 1 to another are 2 pages; reads and filtered-out writes are not."""
    mon = Monitor(Attrs(sample_us=5000, aggr_us=100_000, min_nr_regions=3,
                        max_nr_regions=1000), parse_conditions("!cpus:3"), seed=1)
    mon.add_target(10, [(BASE, BASE + 1024 * PAGE)])
    mon.start(0)
    for t, page in ((1, 0), (2, 0), (60, 0), (3, 700), (4, 700 - 1)):
        mon.report_access(pid=10, addr=BASE + page * PAGE + 8, time_ns=t * MS, write=True,
                          cpu=0)
    mon.report_access(pid=10, addr=BASE + 5 * PAGE, time_ns=5 * MS, write=False)  # a read
    mon.report_access(pid=10, addr=BASE + 9 * PAGE, time_ns=5 * MS, write=True, cpu=3)
    (snap,) = mon.advance(100 * MS)
    assert snap.written_pages is not None and int(snap.written_pages.sum()) == 3
    # regions that merged carry the sum of their pages
    assert int(snap.written_pages[region_at(snap, BASE + 700 * PAGE)]) >= 1
    (nxt,) = mon.advance(200 * MS)
    assert int(nxt.written_pages.sum()) == 0  # reset every aggregation
    assert Monitor(count_written_pages=False).count_written_pages is False


def test_an_exited_target_keeps_its_last_interval_and_flush_closes_the_running_one():
    """Reports of a target that exits mid-interval are counted in that interval's
    snapshot (not as unmatched), and then it gets no more snapshots; flush() closes
    the running interval early so its reports are not lost either."""
    mon = Monitor(Attrs(sample_us=5000, aggr_us=100_000, min_nr_regions=3), seed=1)
    a = mon.add_target(10, [(BASE, BASE + 64 * PAGE)])
    mon.add_target(11, [(BASE, BASE + 64 * PAGE)])
    mon.start(0)
    mon.report_access(pid=10, addr=BASE, time_ns=30 * MS)
    a.exited = True  # as run_live marks it when the primitive says so
    snaps = mon.advance(100 * MS)
    assert sorted(s.pid for s in snaps) == [10, 11]
    assert next(s for s in snaps if s.pid == 10).nr_accesses.sum() == 1
    assert mon.stats.unmatched == 0 and a.closed
    mon.report_access(pid=11, addr=BASE, time_ns=130 * MS)
    assert [s.pid for s in mon.advance(200 * MS)] == [11]
    mon.report_access(pid=11, addr=BASE, time_ns=230 * MS)
    assert mon.flush(202 * MS) == []  # shorter than one sampling interval: nothing to close
    (last,) = mon.flush(240 * MS)
    assert (last.start_ns, last.time_ns) == (200 * MS, 240 * MS)
    assert last.nr_accesses.sum() == 1


def test_mapped_spans_exclude_the_holes_that_the_three_regions_cover(tmp_path, mapping_process):
    """A process's three regions span unmapped holes; the snapshot says which parts
    are mapped (written when it changes, carried forward by the reader)."""
    from udamon.record.reader import read_record
    from udamon.record.writer import RecordWriter, build_header
    from udamon.targets.procmaps import read_vmas
    p = mapping_process
    mon = Monitor(Attrs(aggr_us=100_000, update_us=100_000), seed=1)
    t = mon.add_target(p.pid, provider=vaddr_provider(p.pid))
    vmas = read_vmas(p.pid)
    mon.start(0)
    (s1,) = mon.advance(100 * MS)
    assert s1.mapped is not None
    mapped = sum(e - s for s, e in s1.mapped)
    monitored = sum(e - s for s, e in t.ranges)
    assert mapped < monitored  # the holes inside the three regions are not mapped
    for s, e in s1.mapped:
        assert any(v.start <= s and e <= v.end or v.start < e and s < v.end for v in vmas)
    (s2,) = mon.advance(200 * MS)
    assert s2.mapped is None  # unchanged: not repeated
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "mapped"
    mon.advance(300 * MS)  # the update interval re-reads the maps
    (s4,) = mon.advance(400 * MS)
    assert s4.mapped is not None
    assert sum(e - s for s, e in s4.mapped) >= mapped + (64 << 20)
    path = tmp_path / "r.jsonl"
    w = RecordWriter(str(path))
    w.write_header(build_header(mon.attrs, "replay", "complete", [], [], mon.targets))
    for s in (s1, s2, s4):
        w.write_snapshot(s)
    w.close("duration")
    rec = read_record(str(path))
    assert [s.mapped for s in rec.snapshots] == [s1.mapped, s1.mapped, s4.mapped]


def _counts_after_one_window(reports, nsamp: int, dense_cells: int, monkeypatch) -> tuple:
    import udamon.core.monitor as m

    monkeypatch.setattr(m, "DENSE_CELLS", dense_cells)
    mon = Monitor(Attrs(sample_us=1000, aggr_us=1000 * nsamp, min_nr_regions=37,
                        max_nr_regions=1000), probes=[Probe.parse("w=write")], seed=4)
    mon.add_target(1, [(0x10000000, 0x10000000 + (64 << 20))])
    mon.start(0)
    mon.report_batch(reports)
    (s,) = mon.advance(nsamp * 1_000_000)
    return s.start.tolist(), s.nr_accesses.tolist(), s.probe_hits["w"].tolist()


def test_counting_without_the_bitmap_gives_the_same_counts(monkeypatch):
    """The sparse count (distinct region/interval pairs, for many sampling intervals)
    and the bitmap count agree report for report."""
    rng = np.random.default_rng(7)
    for nsamp in (3, 50, 400):
        n = 20_000
        reps = udamon.make_reports(
            time_ns=np.sort(rng.integers(0, nsamp * 1_000_000, n)), pid=1,
            addr=0x10000000 + rng.integers(0, 64 << 20, n).astype(np.uint64),
            write=rng.random(n) < 0.3)
        dense = _counts_after_one_window(reps, nsamp, 1 << 40, monkeypatch)
        sparse = _counts_after_one_window(reps, nsamp, 0, monkeypatch)
        assert dense == sparse
        assert max(dense[1]) <= nsamp and sum(dense[1]) > 0


_MANY_INTERVALS = r"""
import sys
import numpy as np
import udamon
from udamon import Attrs, Monitor, Probe
# 1 us sampling in a 1 s aggregation: a million sampling intervals, 1000 regions and
# 10 probes: a bitmap per probe would be 10^9 cells each
mon = Monitor(Attrs(sample_us=1, aggr_us=1_000_000, min_nr_regions=1000,
                    max_nr_regions=1000),
              probes=[Probe.parse(f"p{i}=cpus:{i}") for i in range(10)], seed=1)
mon.add_target(1, [(0x10000000, 0x10000000 + (4 << 30))])
mon.start(0)
rng = np.random.default_rng(0)
for w in range(3):
    n = 1_000_000
    mon.report_batch(udamon.make_reports(
        time_ns=w * 1_000_000_000 + np.sort(rng.integers(0, 1_000_000_000, n)), pid=1,
        addr=0x10000000 + rng.integers(0, 4 << 30, n).astype(np.uint64),
        cpu=rng.integers(0, 10, n)))
    snaps = mon.advance((w + 1) * 1_000_000_000)
    assert len(snaps) == 1 and snaps[0].nr_accesses.sum() > 0
# VmHWM: this process's own peak (ru_maxrss is kept across exec: a child started by
# vfork from a big pytest process would start at the parent's size)
print(next(int(ln.split()[1]) for ln in open("/proc/self/status")
           if ln.startswith("VmHWM:")) // 1024)
"""


def test_memory_follows_the_reports_not_intervals_times_regions():
    """--sample 1us --aggr 1s with 1000 regions and 10 probes: peak RSS stays under
    200 MiB (the per-probe intervals x regions bitmap peaked at 1 GiB)."""
    r = subprocess.run([sys.executable, "-c", _MANY_INTERVALS], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS {peak_mib} MiB")
    assert peak_mib < 200
