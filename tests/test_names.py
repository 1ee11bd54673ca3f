"""Names for memory and threads (issue 15, "names everywhere").

Regions carry the mappings they overlap (from /proc/PID/maps: a path, [heap],
[stack], [anon], memfd:NAME, [anon:NAME]) and threads their comm, in the record
(written when they change), in every report that lists regions or threads, and in
the exporter's labels (bounded).  The live tests record a real workload whose
memory and threads have known names (tests/workloads/named_maps.c) with hint and
wp; the others check the parts on real /proc files of this process and on
records the test writes.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_udamon

import udamon
from udamon import Attrs, Monitor, Probe
from udamon.core.names import (
    UNMAPPED,
    NameTracker,
    join_names,
    region_mappings,
    short_name,
    thread_label,
)
from udamon.errors import InputError
from udamon.record.reader import read_record
from udamon.record.writer import RecordWriter, build_header
from udamon.report.thread_labels import ThreadLabels
from udamon.targets.names import named_spans
from udamon.targets.procmaps import parse_maps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads.build import BuildError, build  # noqa: E402

MS = 1_000_000
PR_SET_NAME = 15

MAPS = """\
55d000000000-55d000001000 r--p 00000000 08:01 1234   /usr/bin/app
55d000001000-55d000003000 r-xp 00001000 08:01 1234   /usr/bin/app
55d000010000-55d000020000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 rw-s 00000000 00:01 77     /memfd:jit cache (deleted)
7f0000200000-7f0000300000 rw-p 00000000 00:00 0      [anon:arena]
7f0000300000-7f0000400000 rw-s 00000000 08:01 99     /var/lib/app/data with space.db
7f0000400000-7f0000401000 r--p 00000000 08:01 98     /tmp/gone (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0      [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


# -- names from /proc/PID/maps ------------------------------------------------------


def test_mapping_names_from_maps_text():
    spans = named_spans(parse_maps(MAPS))
    assert spans == [
        (0x55d000000000, 0x55d000003000, "/usr/bin/app"),  # text and rodata: one span
        (0x55d000010000, 0x55d000020000, "[heap]"),
        (0x7f0000000000, 0x7f0000100000, "[anon]"),
        (0x7f0000100000, 0x7f0000200000, "memfd:jit cache"),
        (0x7f0000200000, 0x7f0000300000, "[anon:arena]"),
        (0x7f0000300000, 0x7f0000400000, "/var/lib/app/data with space.db"),
        (0x7f0000400000, 0x7f0000401000, "/tmp/gone (deleted)"),
        (0x7ffc00000000, 0x7ffc00021000, "[stack]"),
    ]  # [vsyscall] is not the process's


def test_region_names_overlaps_and_holes():
    table = named_spans(parse_maps(MAPS))
    start = np.asarray([0x55d000001000, 0x7f00000ff000, 0x55d000004000, 0x55d000002000,
                        0x7f0000000000], dtype=np.uint64)
    end = np.asarray([0x55d000002000, 0x7f0000101000, 0x55d000008000, 0x55d000018000,
                      0x7f0000400000], dtype=np.uint64)
    got = region_mappings(table, start, end)
    assert got[0] == ["/usr/bin/app"]  # wholly inside
    assert got[1] == ["[anon]", "memfd:jit cache"]  # a page of each: address order
    assert got[2] == [UNMAPPED]  # wholly in the hole between the program and the heap
    assert got[3] == [UNMAPPED, "[heap]", "/usr/bin/app"]  # most bytes first
    assert got[4] == ["[anon]", "memfd:jit cache", "[anon:arena]",
                      "/var/lib/app/data with space.db"]
    assert join_names(got[1]) == "[anon]+memfd:jit cache"
    assert join_names(got[4]) == "[anon] (+3)"
    long = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30"
    assert short_name(long) == ".../libstdc++.so.6.0.30" and short_name("[heap]") == "[heap]"
    assert len(short_name("/a/" + "x" * 60)) <= 24
    assert thread_label(12, {12: "io_thd_1"}) == "12 (io_thd_1)"
    assert thread_label(13, {12: "io_thd_1"}) == "13" and thread_label("other", None) == "other"


def _set_thread_name(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0) == 0


class _Snap:
    def __init__(self, pid: int):
        self.pid = pid
        self.names = self.threads = None


def test_name_tracker_follows_a_real_process():
    """This process: a thread that starts unnamed and names itself after udamon first
    looked (as threads do), one that exits before it is looked at, and memory mapped
    in between."""
    pid = os.getpid()
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    tracker = NameTracker(update_ns=0)
    tracker.add(pid)
    first = tracker.threads(pid)
    assert first[pid] == comm
    go, ready, done, end = (threading.Event() for _ in range(4))
    tid = [0]

    def worker():
        tid[0] = threading.get_native_id()
        ready.set()
        go.wait(10)
        _set_thread_name("udamon-t1")  # named after udamon first read it
        done.set()
        end.wait(10)

    def brief():
        tid.append(threading.get_native_id())
        _set_thread_name("udamon-brief")

    t = threading.Thread(target=worker)
    t.start()
    ready.wait(10)
    b = threading.Thread(target=brief)
    b.start()
    b.join()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}/task/{tid[1]}") and time.monotonic() < deadline:
        time.sleep(0.01)  # join() returns before the kernel has let go of the thread
    buf = mmap.mmap(-1, 1 << 20)
    fd = os.memfd_create("udamon-names")
    os.ftruncate(fd, 1 << 20)
    mem = mmap.mmap(fd, 1 << 20)
    try:
        s1 = _Snap(pid)
        tracker.annotate(s1)
        assert s1.threads[tid[0]] == Path(f"/proc/{pid}/task/{tid[0]}/comm").read_text().strip()
        assert "udamon-brief" not in s1.threads.values()  # gone before it was looked at
        assert "memfd:udamon-names" in {n for _, _, n in s1.names}
        go.set()
        done.wait(10)
        s2 = _Snap(pid)
        tracker.annotate(s2)
        assert s2.threads[tid[0]] == "udamon-t1"  # young unnamed threads are read again
        assert s1.threads[tid[0]] != "udamon-t1"  # what the first snapshot had stays
    finally:
        go.set()
        end.set()
        t.join()
        mem.close()
        buf.close()
        os.close(fd)
    s3 = _Snap(pid)
    tracker.annotate(s3)
    assert s3.threads[tid[0]] == "udamon-t1"  # an exited thread keeps its name
    assert "memfd:udamon-names" not in {n for _, _, n in s3.names}  # unmapped


def test_name_tracker_reads_young_threads_in_turn(monkeypatch):
    """Many unnamed young threads: at most YOUNG_READS comm reads per listing besides
    the new threads', and in turn, so each is read again within a few listings."""
    import udamon.core.names as names_mod

    monkeypatch.setattr(names_mod, "YOUNG_READS", 8)
    pid = os.getpid()
    ev = threading.Event()
    ts = [threading.Thread(target=ev.wait) for _ in range(40)]
    for t in ts:
        t.start()
    reads: list[int] = []
    real = names_mod.thread_comm
    monkeypatch.setattr(names_mod, "thread_comm",
                        lambda p, t: reads.append(t) or real(p, t))
    try:
        tracker = NameTracker(update_ns=10**12)
        tracker.add(pid)
        tids = set(tracker.threads(pid))
        assert len(tids) >= 41 and len(reads) == len(tids)  # every new thread once
        seen: set[int] = set()
        for _ in range(len(tids) // 8 + 1):
            reads.clear()
            tracker.annotate(_Snap(pid))
            assert len(reads) <= 8
            seen.update(reads)
        names = tracker.threads(pid)
        unnamed = {t for t in tids if names[t] == names[pid]}  # the 40 and the main thread
        assert len(unnamed) >= 41 and seen == unnamed
    finally:
        ev.set()
        for t in ts:
            t.join()


# -- the record -----------------------------------------------------------------------

BASE = 0x4000_0000


def _write(path, tables, threads, header_threads=None):
    """A record whose snapshot k has names ``tables[k]`` and threads ``threads[k]``."""
    mon = Monitor(Attrs(min_nr_regions=3, max_nr_regions=6),
                  probes=[Probe.parse("thread:11=threads:11")], seed=1)
    mon.add_target(5, [(BASE, BASE + 12 * 4096)], name="t")
    header = build_header(mon.attrs, "hint", "unknown", mon.filters, mon.probes, mon.targets)
    if header_threads:
        header["targets"][0]["threads"] = header_threads
    w = RecordWriter(str(path))
    w.write_header(header)
    mon.start(0)
    written = []
    for k, (tab, thr) in enumerate(zip(tables, threads, strict=True)):
        mon.report_batch(udamon.make_reports(time_ns=k * 100 * MS + np.arange(4) * MS, pid=5,
                                             addr=BASE + 4096 * np.arange(4), tid=11))
        for s in mon.advance((k + 1) * 100 * MS):
            s.names, s.threads = tab, thr
            w.write_snapshot(s)
            written.append(s)
    w.close("duration")
    return written


def test_names_round_trip_written_only_when_they_change(tmp_path):
    path = tmp_path / "n.jsonl"
    a = [(BASE, BASE + 8 * 4096, "/usr/lib/libc.so.6"), (BASE + 8 * 4096, BASE + 12 * 4096,
                                                         "[heap]")]
    b = [*a[:1], (BASE + 8 * 4096, BASE + 16 * 4096, "[heap]")]  # the heap grew
    t0 = {5: "app", 11: "worker"}
    t1 = {**t0, 12: "io_thd_1"}  # a new thread
    t2 = {**t1, 11: "worker-2"}  # renamed
    _write(path, [a, list(a), b, b], [t0, t0, t1, t2], header_threads={"5": "app",
                                                                       "11": "worker"})
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    snaps = lines[1:-1]
    assert ["names" in s for s in snaps] == [True, False, True, False]
    assert [s.get("threads") for s in snaps] == [None, None, {"12": "io_thd_1"},
                                                 {"11": "worker-2"}]
    rec = read_record(str(path))
    assert [s.names for s in rec.snapshots] == [a, a, b, b]
    assert rec.snapshots[0].names is rec.snapshots[1].names  # carried, not copied
    assert rec.snapshots[1].threads == t0 and rec.snapshots[2].threads == t1
    assert rec.snapshots[3].threads == t2 and rec.thread_names(5) == t2
    s0 = rec.snapshots[0]
    for lo, hi, got in zip(s0.start.tolist(), s0.end.tolist(), s0.region_mappings(),
                           strict=True):
        assert sorted(got) == sorted(n for s, e, n in a if s < hi and e > lo)
    doc = json.loads(run_udamon("report", "access", "-i", str(path), "--format", "json",
                                check=True).stdout)
    tgt = doc["targets"][0]
    assert tgt["threads"] == {"5": "app", "11": "worker-2", "12": "io_thd_1"}
    for r in tgt["snapshots"][0]["regions"]:
        want = [n for s, e, n in b if s < r["end"] and e > r["start"]]
        assert sorted(r["mappings"]) == sorted(want) and r["mapping"]
    text = run_udamon("report", "access", "-i", str(path), check=True).stdout
    assert "thread:11 (worker-2)" in text and "mapping" in text and "/usr/lib/libc.so.6" in text


@pytest.mark.parametrize("bad,msg", [
    ('"names":[[1073741824,1073774592]]', "names must be a list of [start, end, name]"),
    ('"names":[[1073774592,1073741824,"x"]]', "names must be a list of [start, end, name]"),
    ('"names":[[2,3,"b"],[0,1,"a"]]', "in address order"),
    ('"names":{"a":1}', "names must be a list"),
    ('"threads":{"x":"y"}', "threads must map thread ids to names"),
    ('"threads":{"12":3}', "threads must map thread ids to names"),
])
def test_damaged_names_say_file_and_line(tmp_path, bad, msg):
    path = tmp_path / "n.jsonl"
    a = [(BASE, BASE + 12 * 4096, "[heap]")]
    _write(path, [a, a], [{5: "app"}, {5: "app"}])
    lines = path.read_text().splitlines(keepends=True)
    key = bad.split(":", 1)[0]
    obj = lines[2]
    assert key not in obj
    lines[2] = obj.replace('"regions":', bad + ',"regions":', 1)
    path.write_text("".join(lines))
    with pytest.raises(InputError) as e:
        read_record(str(path))
    assert "n.jsonl:3: " in str(e.value) and msg in str(e.value), str(e.value)
    p = run_udamon("report", "access", "-i", str(path))
    assert p.returncode == 2 and "n.jsonl:3:" in p.stderr and msg in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_damaged_header_threads_say_the_line(tmp_path):
    path = tmp_path / "n.jsonl"
    _write(path, [None], [None], header_threads={"5": ["not", "a", "name"]})
    p = run_udamon("report", "access", "-i", str(path))
    assert p.returncode == 2 and "n.jsonl:1:" in p.stderr, p.stderr
    assert "target 5's threads must map thread ids to names" in p.stderr


def test_replay_records_have_no_names_and_reports_say_so(tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("time_ns,pid,tid,cpu,addr,size,write\n"
                   + "".join(f"{k * MS},7,70,0,{BASE + (k % 8) * 4096},4096,{k % 2}\n"
                             for k in range(400)))
    rec = tmp_path / "r.jsonl"
    run_udamon("record", "--input", str(csv), "--breakdown", "thread,rw", "-q", "-o", str(rec),
               check=True)
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert all("threads" not in t for t in lines[0]["targets"])
    assert not any("names" in x or "threads" in x for x in lines[1:])
    text = run_udamon("report", "access", "-i", str(rec), check=True).stdout
    assert "mapping names: not in this record" in text
    assert "(unmapped)" not in text and "thread:70 (" not in text
    assert re.search(r"^\s+start\s+end\s+size\s", text, re.M), text  # no mapping column
    doc = json.loads(run_udamon("report", "access", "-i", str(rec), "--format", "json",
                                check=True).stdout)
    assert all(r["mapping"] is None and r["mappings"] is None
               for s in doc["targets"][0]["snapshots"] for r in s["regions"])
    assert doc["targets"][0]["threads"] == {}
    heat = json.loads(run_udamon("report", "heatmap", "-i", str(rec), "--format", "json",
                                 check=True).stdout)
    assert heat["mappings"] is None


def test_thread_labels_are_capped_and_sticky():
    tl = ThreadLabels(cap=2)
    names = {1: "a", 2: "b", 3: "c"}
    got = tl.assign(9, {"1": 5.0, "2": 50.0, "3": 20.0, "unknown": 4.0}, names)
    assert got == {"1": ("other", "other"), "2": ("2", "b"), "3": ("3", "c"),
                   "unknown": ("unknown", "unknown")}
    got = tl.assign(9, {"1": 1000.0, "4": 1.0}, names)  # busier now, but the slots are taken
    assert got == {"1": ("other", "other"), "4": ("other", "other")}
    assert tl.assign(9, {"2": 1.0}, names) == {"2": ("2", "b")} and tl.labelled(9) == 2
    assert ThreadLabels(0).assign(1, {"5": 1.0}, {5: "x"}) == {"5": ("other", "other")}
    assert ThreadLabels(1).assign(1, {"6": 1.0}, {}) == {"6": ("6", "")}  # name unknown


# -- live: a real workload with named memory and threads ---------------------------------


@pytest.fixture(scope="module")
def named_bin():
    try:
        return build("named_maps")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


def _start(binary, tmp_path, *args):
    f = tmp_path / "named-file.dat"
    p = subprocess.Popen([binary, "--file", str(f), *args], stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    return p, info


def _stop(p) -> dict:
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0, "the workload's data was damaged"
    return json.loads(out.splitlines()[-1])


def _want(info) -> dict[str, str]:
    want = {"F": info["file"], "M": "memfd:udamon_memfd", "A": "[anon]", "H": "[heap]"}
    if info["anon_name"]:
        want["N"] = "[anon:udamon_anon]"
    return want


def _check_region_names(rec, info, keys) -> None:
    """Every region overlapping a buffer names the buffer's mapping; regions wholly
    inside name only it."""
    want = _want(info)
    inside = 0
    for s in rec.snapshots:
        maps = s.region_mappings()
        assert maps is not None
        for k in keys:
            if k not in want:
                continue
            lo, hi = info[k]
            for i in np.flatnonzero((s.start < hi) & (s.end > lo)).tolist():
                assert want[k] in maps[i], (k, want[k], maps[i])
                if s.start[i] >= lo and s.end[i] <= hi:
                    assert maps[i] == [want[k]], (k, maps[i])
                    inside += 1
    assert inside > 0


def _check_threads(names: dict, info) -> None:
    assert names.get(info["reader_tid"]) == "nm_reader"  # pthread_setname_np
    assert names.get(info["writer_tid"]) == "nm_writer"  # prctl(PR_SET_NAME)
    assert names.get(info["pid"]) == "named_maps"


def _no_anon_name_note(info):
    if not info["anon_name"]:
        print(f"PR_SET_VMA_ANON_NAME refused by this kernel ({info['anon_name_error']}): "
              "the [anon:NAME] check is skipped (needs Linux >= 5.17 with "
              "CONFIG_ANON_VMA_NAME)")


def _hint_ok():
    from udamon.primitives.hint import hint_available

    return hint_available()


def _wp_ok():
    from udamon.primitives.registry import entry

    return entry("wp").available()


needs_hint = pytest.mark.skipif(not _hint_ok()[0], reason=f"hint unavailable: {_hint_ok()[1]}")
needs_wp = pytest.mark.skipif(not _wp_ok()[0], reason=f"wp unavailable: {_wp_ok()[1]}")


@needs_hint
def test_hint_record_names_regions_and_threads(tmp_path, named_bin):
    wl, info = _start(named_bin, tmp_path, "--duration", "60", "--churn")
    try:
        rec_path = tmp_path / "hint.jsonl"
        # at least 300 regions: merged ones stay within span/300 (<= 3.4 MiB of the
        # workload's <= ~1 GiB), so every 8 MiB buffer holds whole regions; with 30 (up
        # to 34 MiB each) that was left to a lucky split, and 1 run in 4 had none
        p = run_udamon("record", "--primitive", "hint", "--pid", str(info["pid"]),
                       "--breakdown", "thread,rw", "--regions", "300,1000", "--duration", "4s",
                       "-q", "-o", str(rec_path), timeout=90)
        assert p.returncode == 0, p.stderr
    finally:
        end = _stop(wl)
    _no_anon_name_note(info)
    rec = read_record(str(rec_path))
    _check_threads({int(k): v for k, v in rec.header["targets"][0]["threads"].items()}, info)
    _check_region_names(rec, info, "FMNAH")
    stack = info["stack"]
    s = rec.snapshots[-1]
    i = int(np.flatnonzero((s.start <= stack) & (s.end > stack))[0])
    assert "[stack]" in s.region_mappings()[i]
    names = rec.thread_names()
    known = {info["reader_tid"]: "nm_reader", info["writer_tid"]: "nm_writer",
             info["pid"]: "named_maps"}
    # threads that came and went: named as /proc said (nm_short, or the name they had
    # before they set theirs), or by tid alone; never another thread's name
    for tid, name in names.items():
        assert known.get(tid, name) == name and name in (*known.values(), "nm_short"), \
            (tid, name)
    assert end["short_threads"] > 0

    text = run_udamon("report", "access", "-i", str(rec_path), "--snapshot", "sum",
                      check=True).stdout
    print(text)
    assert f"thread:{info['reader_tid']} (nm_reader)" in text
    assert f"thread:{info['writer_tid']} (nm_writer)" in text
    for n in ("memfd:udamon_memfd", "[heap]", "[anon]", "[stack]",
              ".../" + Path(info["file"]).name):
        assert n in text, n
    doc = json.loads(run_udamon("report", "access", "-i", str(rec_path), "--snapshot", "sum",
                                "--format", "json", check=True).stdout)
    tgt = doc["targets"][0]
    _check_threads({int(k): v for k, v in tgt["threads"].items()}, info)
    regions = tgt["snapshots"][0]["regions"]
    lo, hi = info["M"]
    assert any(r["mappings"] == ["memfd:udamon_memfd"] for r in regions
               if r["start"] >= lo and r["end"] <= hi)
    assert any(info["file"] in r["mappings"] for r in regions)  # the full path in JSON

    text = run_udamon("report", "sharing", "-i", str(rec_path), check=True).stdout
    assert f"{info['reader_tid']} (nm_reader)" in text and "(nm_writer)" in text
    doc = json.loads(run_udamon("report", "sharing", "-i", str(rec_path), "--format", "json",
                                check=True).stdout)
    assert doc["thread_names"][str(info["reader_tid"])] == "nm_reader"
    tm = next(m for m in doc["matrices"] if m["kind"] == "thread")
    assert f"{info['writer_tid']} (nm_writer)" in tm["labels"]
    heat = json.loads(run_udamon("report", "heatmap", "-i", str(rec_path), "--format", "json",
                                 check=True).stdout)
    assert {"start": lo, "end": hi, "name": "memfd:udamon_memfd"} in heat["mappings"]


@needs_wp
def test_wp_record_with_ranges_names_regions_and_threads(tmp_path, named_bin):
    """Ranges given (no range provider): udamon reads the maps for the names itself."""
    wl, info = _start(named_bin, tmp_path, "--duration", "60")
    lo = min(info[k][0] for k in "FMNA")
    hi = max(info[k][1] for k in "FMNA")
    try:
        rec_path = tmp_path / "wp.jsonl"
        p = run_udamon("record", "--primitive", "wp", "--pid", str(info["pid"]),
                       "--range", f"{lo:#x}-{hi:#x}", "--regions", "20,400",
                       "--breakdown", "thread,numa", "--duration", "3s", "-q",
                       "-o", str(rec_path), timeout=90)
        assert p.returncode == 0, p.stderr
    finally:
        _stop(wl)
    rec = read_record(str(rec_path))
    assert rec.end["reason"] == "duration"
    _check_threads(rec.thread_names(), info)
    _check_region_names(rec, info, "FMNA")
    doc = json.loads(run_udamon("report", "numa", "-i", str(rec_path), "--format", "json",
                                check=True).stdout)
    threads = doc["targets"][0]["threads"]
    assert threads[str(info["writer_tid"])]["name"] == "nm_writer"
    text = run_udamon("report", "numa", "-i", str(rec_path), check=True).stdout
    assert f"{info['writer_tid']} (nm_writer)" in text
    text = run_udamon("report", "access", "-i", str(rec_path), check=True).stdout
    assert f"thread:{info['writer_tid']} (nm_writer)" in text and "[anon]" in text


@needs_wp
def test_monitor_view_names_regions_and_threads(tmp_path, named_bin):
    """The live terminal view: a mapping column and thread probes as ``tid (comm)``."""
    wl, info = _start(named_bin, tmp_path, "--duration", "60")
    lo = min(info[k][0] for k in "FMA")
    hi = max(info[k][1] for k in "FMA")
    try:
        p = run_udamon("monitor", "--primitive", "wp", "--pid", str(info["pid"]),
                       "--range", f"{lo:#x}-{hi:#x}", "--regions", "10,100",
                       "--breakdown", "thread", "--duration", "3s", "--top", "40",
                       timeout=90)
    finally:
        _stop(wl)
    assert p.returncode == 0, p.stderr
    print(p.stdout)
    assert "ended: duration" in p.stdout
    # wp sees writes: the writer's probe has hits, titled with its name
    assert f"hottest by thread:{info['writer_tid']} (nm_writer)" in p.stdout
    assert re.search(r"^\s*start\s+end\s+size\s.*\sage\s+mapping\s*$", p.stdout, re.M)
    # (wp cannot protect a shared file mapping: F has no hits, so no row)
    for name in ("memfd:udamon_memfd", "[anon]"):
        assert name in p.stdout, name


def _metric_lines(text: str, name: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m:
            out.append({**dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))),
                        "value": m.group(2)})
    return out


@needs_hint
def test_exporter_labels_comm_and_capped_thread_names(tmp_path, named_bin):
    wl, info = _start(named_bin, tmp_path, "--duration", "60", "--churn")
    ex = subprocess.Popen([sys.executable, "-m", "udamon", "exporter", "--primitive", "hint",
                           "--pid", str(info["pid"]), "--breakdown", "thread", "--port", "0",
                           "--thread-labels", "1", "-q"], stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", ex.stderr.readline())
        assert m
        url = f"http://127.0.0.1:{m.group(1)}/metrics"
        deadline = time.time() + 30
        rows: list[dict] = []
        while time.time() < deadline:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            rows = _metric_lines(text, "udamon_thread_accesses_total")
            if {r["tid"] for r in rows} >= {"other"} and any(r["tid"].isdigit() for r in rows):
                break
            time.sleep(0.5)
        print(text)
        regions = _metric_lines(text, "udamon_regions")
        assert regions and all(r["comm"] == "named_maps" and r["pid"] == str(info["pid"])
                               for r in regions)
        assert all(r["comm"] == "named_maps" for r in rows)
        own = [r for r in rows if r["tid"].isdigit()]
        assert len(own) == 1, rows  # --thread-labels 1: one thread with its own labels
        names = {info["reader_tid"]: "nm_reader", info["writer_tid"]: "nm_writer",
                 info["pid"]: "named_maps"}
        assert own[0]["thread"] == names.get(int(own[0]["tid"]), own[0]["thread"])
        assert own[0]["thread"] in (*names.values(), "nm_short", "")
        assert any(r["tid"] == "other" and r["thread"] == "other" for r in rows), rows
        assert {r["tid"] for r in rows} <= {own[0]["tid"], "other", "unknown"}
        for r in _metric_lines(text, "udamon_thread_access_bytes_total"):
            assert r["tid"] in (own[0]["tid"], "other", "unknown")
        ex.send_signal(signal.SIGTERM)
        assert ex.wait(15) == 0
    finally:
        if ex.poll() is None:
            ex.kill()
            ex.wait()
        _stop(wl)


@pytest.mark.parametrize("value", ["-1", "10001", "many"])
def test_exporter_thread_labels_bad_value(value):
    p = run_udamon("exporter", "--primitive", "hint", "--pid", str(os.getpid()),
                   "--thread-labels", value)
    assert p.returncode == 2, p.stderr
    assert "--thread-labels" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr
