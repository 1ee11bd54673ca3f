"""The pmu primitive: what the machine offers, and the parsing of what PEBS, IBS and SPE
would deliver.

This machine has no hardware PMU, so (a) `--primitive pmu` must refuse with one
line, (b) detection is checked on constructed sysfs trees (Intel, Sapphire
Rapids-style with mem-loads-aux, AMD, Arm), (c) the ring-buffer parsing shared with
the tracepoint reader is checked on constructed ring bytes in the PEBS/IBS sample
layout and on constructed SPE AUX packet streams, and (d) the same ring code and
sample layout run live on the software page-faults event, which the kernel samples
with exactly the fields the pmu primitive asks for (data_src and weight at their
defaults).
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_udamon

from udamon.intake.reports import MEM_IDS, SOURCE_IDS
from udamon.primitives import perf_mem as pm
from udamon.primitives import pmu
from udamon.primitives.arm_spe import SpeDecoder
from udamon.system.perf_ring import (
    PERF_RECORD_AUX,
    PERF_RECORD_LOST,
    PERF_RECORD_SAMPLE,
    PERF_TYPE_SOFTWARE,
    PerfEventAttr,
    Ring,
    SampleParser,
    perf_event_open,
    sample_dtype,
)


def _tree(root, pmu_name, typ, events=None, formats=None):
    d = root / pmu_name
    (d / "events").mkdir(parents=True)
    (d / "format").mkdir()
    (d / "type").write_text(f"{typ}\n")
    for k, v in (events or {}).items():
        (d / "events" / k).write_text(v + "\n")
    for k, v in (formats or {}).items():
        (d / "format" / k).write_text(v + "\n")


INTEL_FMT = {"event": "config:0-7", "umask": "config:8-15", "ldlat": "config1:0-15",
             "inv": "config:23", "cmask": "config:24-31"}


# ------------------------------------------------------------------ availability


def test_this_machine_refuses_with_one_line(tmp_path):
    if pmu.detect():
        pytest.skip("this machine has a precise-sampling PMU")
    ok, why = pmu.pmu_available()
    assert not ok and "no precise-sampling PMU is available" in why
    p = run_udamon("record", "--primitive", "pmu", "--pid", str(os.getpid()), "-o",
                   str(tmp_path / "r.jsonl"))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no precise-sampling PMU is available" in lines[0], lines
    assert not (tmp_path / "r.jsonl").exists()


def test_detection_on_constructed_sysfs(tmp_path):
    _tree(tmp_path, "cpu", 4, {"mem-loads": "event=0xcd,umask=0x1,ldlat=3",
                               "mem-stores": "event=0xd0,umask=0x82"}, INTEL_FMT)
    _tree(tmp_path, "ibs_op", 11, {}, {"cnt_ctl": "config:19", "rand_en": "config:57",
                                       "swfilt": "config2:0"})
    _tree(tmp_path, "arm_spe_0", 10, {}, {"ts_enable": "config:0", "jitter": "config:16",
                                          "load_filter": "config:33",
                                          "store_filter": "config:34", "min_latency":
                                          "config2:0-11"})
    _tree(tmp_path, "software", 1)
    b = pmu.detect(str(tmp_path))
    assert [x.kind for x in b] == ["pebs", "ibs", "spe"]
    loads, stores = b[0].events
    assert (loads.type, loads.config, loads.config1, loads.precise) == (4, 0x1CD, pmu.LDLAT, 3)
    assert (stores.config, stores.config1) == (0x82D0, 0)
    assert b[1].events[0].config == 1 << 19 and b[1].events[0].type == 11
    assert b[2].events[0].config == (1 | 1 << 16 | 1 << 33 | 1 << 34)
    assert "Intel PEBS" in b[0].describe() and "mem-stores" in b[0].describe()


def test_detection_sapphire_rapids_aux_leader_and_hybrid(tmp_path):
    _tree(tmp_path, "cpu_core", 8, {"mem-loads": "event=0xcd,umask=0x1,ldlat=3",
                                    "mem-loads-aux": "event=0x03,umask=0x82",
                                    "mem-stores": "event=0xcd,umask=0x2"}, INTEL_FMT)
    _tree(tmp_path, "cpu_atom", 9, {"mem-loads": "event=0xd0,umask=0x5,ldlat=3",
                                    "mem-stores": "event=0xd0,umask=0x6"}, INTEL_FMT)
    core, atom = pmu.detect(str(tmp_path))
    aux, loads, stores = core.events
    assert aux.aux_leader and not aux.needs_leader and aux.config == 0x8203
    assert loads.needs_leader and not stores.needs_leader
    assert [e.config for e in atom.events] == [0x5D0, 0x6D0] and atom.pmu == "cpu_atom"


def test_encode_event_split_fields():
    fm = {"event": ("config", [(0, 7), (32, 35)]), "umask": ("config", [(8, 15)])}
    assert pmu.encode_event("event=0x1cd,umask=0x2", fm) == (0x1_0000_02CD, 0, 0)
    with pytest.raises(ValueError, match="unknown event term"):
        pmu.encode_event("nosuch=1", fm)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to try a system-wide event")
def test_listed_but_unusable_pmu_says_why(tmp_path):
    """A kernel that lists PEBS events the hardware does not back (a VM): the open is
    tried and its failure is the reason given."""
    if pmu.detect():
        pytest.skip("this machine has a precise-sampling PMU")
    _tree(tmp_path, "cpu", 4, {"mem-loads": "event=0xcd,umask=0x1,ldlat=3"}, INTEL_FMT)
    ok, why = pmu.pmu_available(str(tmp_path))
    assert not ok and "opening cpu/mem-loads,ldlat=30/P failed" in why, why


# ------------------------------------------------------------------ constructed PEBS/IBS ring bytes

DT = sample_dtype(pmu.MEM_SAMPLE)


def test_mem_sample_layout_is_the_kernels_order():
    """IDENTIFIER, TID, TIME, ADDR, CPU, WEIGHT, DATA_SRC (perf_output_sample order)."""
    off = {n: DT.fields[n][1] for n in DT.names}
    assert off == {"type": 0, "size": 6, "id": 8, "pid": 16, "tid": 20, "time": 24, "addr": 32,
                   "cpu": 40, "cpu_res": 44, "weight": 48, "data_src": 56}
    assert DT.itemsize == 64


def _samples(n, *, pid=100, tid=101, cpu=0, ds=0, addr0=0x7F0000000000, ident=1, weight=40):
    r = np.zeros(n, dtype=DT)
    r["type"] = PERF_RECORD_SAMPLE
    r["size"] = DT.itemsize
    r["id"] = ident
    r["pid"] = pid
    r["tid"] = tid
    r["time"] = 1_000 + np.arange(n)
    r["addr"] = np.uint64(addr0) + np.arange(n, dtype=np.uint64) * np.uint64(4096) + np.uint64(
        0x18 if addr0 else 0)
    r["cpu"] = cpu
    r["weight"] = weight
    r["data_src"] = ds
    return r


def _lost(n):
    return struct.pack("<IHHQQ", PERF_RECORD_LOST, 0, 24, 7, n)


def test_pebs_ring_bytes_to_reports():
    remote = pm.data_src_value(pm.OP_LOAD, pm.LVL_REM_RAM1 | pm.LVL_HIT, pm.LVLNUM_RAM, remote=1)
    store = pm.data_src_value(pm.OP_STORE, pm.LVL_L1 | pm.LVL_HIT, pm.LVLNUM_L1)
    data = (_samples(3, ds=remote).tobytes() + _lost(5)
            + _samples(2, ds=store, cpu=1, tid=102, addr0=0x7F0000100000).tobytes()
            + _samples(4, ds=store, pid=999).tobytes()  # another process: filtered
            + _samples(2, ds=remote, ident=77).tobytes())  # the aux leader's own samples
    parser = SampleParser(DT)
    recs = parser.parse(data)
    assert parser.lost == 5 and recs.size == 11
    reps, other = pmu.mem_samples_to_reports(recs, np.array([100], dtype=np.int32),
                                             np.array([77], dtype=np.uint64))
    assert other == 6 and reps.size == 5
    assert reps["addr"][:3].tolist() == [0x7F0000000018, 0x7F0000001018, 0x7F0000002018]
    assert (reps["size"] == 1).all() and (reps["source"] == SOURCE_IDS["pmu"]).all()
    assert reps["write"].tolist() == [False] * 3 + [True] * 2
    assert reps["mem"].tolist() == [MEM_IDS["remote-ram"]] * 3 + [MEM_IDS["cache"]] * 2
    assert reps["cpu"].tolist() == [0, 0, 0, 1, 1] and reps["tid"].tolist() == [101] * 3 + [102] * 2
    assert reps["time_ns"].tolist() == [1000, 1001, 1002, 1000, 1001]
    # the fast path (only samples) gives the same
    assert SampleParser(DT).parse(_samples(3, ds=remote).tobytes()).size == 3


def test_ibs_ring_bytes_to_reports():
    ibs_remote = pm.data_src_value(pm.OP_LOAD, 0, pm.LVLNUM_RAM, remote=1, hops=2)
    ibs_local = pm.data_src_value(pm.OP_LOAD, 0, pm.LVLNUM_RAM)
    not_mem = pm.data_src_value(pm.OP_NA, pm.LVL_NA)  # most IBS ops are not loads or stores
    recs = SampleParser(DT).parse(
        _samples(2, ds=ibs_remote).tobytes() + _samples(2, ds=ibs_local).tobytes()
        + _samples(5, ds=not_mem).tobytes()
        + _samples(1, ds=ibs_local, addr0=0).tobytes()  # no valid linear address
        + _samples(1, ds=ibs_local, addr0=0xFFFF_8880_0000_0000).tobytes())  # kernel data
    reps, other = pmu.mem_samples_to_reports(recs, np.array([100], dtype=np.int32))
    assert reps.size == 4 and other == 7
    assert reps["mem"].tolist() == [MEM_IDS["remote-ram"]] * 2 + [MEM_IDS["ram"]] * 2


# ------------------------------------------------------------------ constructed SPE AUX data


def _pkt_addr_va(addr):
    return bytes([0xB2]) + addr.to_bytes(8, "little")


def _spe_record(addr, *, store=False, events=0, lat=0, ctx=None, ts=None):
    b = bytes([0xB0]) + (0x400000 | 0x3 << 61).to_bytes(8, "little")  # PC, EL0
    b += _pkt_addr_va(addr)
    b += bytes([0x49, 0x01 if store else 0x00])  # OP TYPE class LD/ST, ST bit
    b += bytes([0x52]) + events.to_bytes(2, "little")  # EVENTS, 2 bytes
    b += bytes([0x98]) + lat.to_bytes(2, "little")  # COUNTER total latency
    if ctx is not None:
        b += bytes([0x65]) + ctx.to_bytes(4, "little")  # CONTEXT
    b += bytes([0x00, 0x00])  # PAD
    if ts is not None:
        b += bytes([0x71]) + ts.to_bytes(8, "little")
    else:
        b += bytes([0x01])  # END
    return b


def test_spe_packet_decoder():
    remote = 1 << 10 | 1 << 9 | 1 << 8  # REMOTE_ACCESS, LLC_MISS, LLC_ACCESS
    l1_hit = 1 << 2  # L1D access, no refill
    data = (_spe_record(0x7F0000001238, events=l1_hit, lat=12, ctx=4242)
            + _spe_record(0x7F0000002000, store=True, events=remote, lat=300, ts=99)
            + bytes([0x20, 0xB2]) + (0x7F0000003000).to_bytes(8, "little")  # extended addr
            + bytes([0x49, 0x00, 0x01]))
    recs = SpeDecoder().decode(data)
    assert recs["addr"].tolist() == [0x7F0000001238, 0x7F0000002000, 0x7F0000003000]
    assert recs["store"].tolist() == [False, True, False] and recs["is_ldst"].all()
    assert recs["level"].tolist() == [MEM_IDS["cache"], MEM_IDS["remote-ram"], MEM_IDS["unknown"]]
    assert recs["latency"].tolist() == [12, 300, 0]
    assert recs["context"].tolist() == [4242, -1, -1] and recs["timestamp"][1] == 99
    # a record cut between two AUX chunks is completed by the next one
    whole = _spe_record(0x7F0000004000, events=l1_hit)
    d = SpeDecoder()
    assert d.decode(whole[:7]).size == 0
    (r,) = d.decode(whole[7:])
    assert int(r["addr"]) == 0x7F0000004000


class _FakeAux:
    def __init__(self, data: bytes):
        self.data = data
        self.released = 0

    def take_aux(self, off, size):
        self.released = off + size
        return self.data[off: off + size]


def test_spe_aux_records_to_reports():
    """PERF_RECORD_AUX announcements in the ring (with their sample_id trailer: tid,
    time, cpu) point into the AUX area; each becomes reports of the event's target."""
    aux = (_spe_record(0x7F0000001000, events=1 << 2, ctx=501)
           + _spe_record(0xFFFF000012340000, events=1 << 2)  # kernel data: left out
           + _spe_record(0x7F0000002000, store=True, events=1 << 9))
    cut = len(_spe_record(0x7F0000001000, events=1 << 2, ctx=501)) + 5
    fake = _FakeAux(aux)
    stream = pmu.SpeStream(pid=500, tid=502)

    def aux_rec(off, size, tid, t, cpu):
        return struct.pack("<IHHQQQ", PERF_RECORD_AUX, 0, 64, off, size, 0) + struct.pack(
            "<iiqiIQ", 500, tid, t, cpu, 0, 3)

    ring = aux_rec(0, cut, 502, 5_000, 1) + aux_rec(cut, len(aux) - cut, 502, 6_000, 0)
    parser = SampleParser(sample_dtype(pmu.SPE_SAMPLE),
                          on_other=pmu.PmuPrimitive._aux_handler(fake, stream))
    assert parser.parse(ring).size == 0  # no samples in an SPE ring: only AUX records
    reps = np.concatenate(stream.take())
    assert reps["addr"].tolist() == [0x7F0000001000, 0x7F0000002000]
    assert reps["tid"].tolist() == [501, 502]  # the CONTEXT packet's, else the event's thread
    assert reps["cpu"].tolist() == [1, 0] and reps["time_ns"].tolist() == [5_000, 6_000]
    assert reps["write"].tolist() == [False, True]
    assert reps["mem"].tolist() == [MEM_IDS["cache"], MEM_IDS["ram"]]
    assert (reps["pid"] == 500).all() and fake.released == len(aux)


# ------------------------------------------------------------------ the same ring code, live


TOUCH = """
import mmap, sys
m = mmap.mmap(-1, 4 << 20)
m.madvise(mmap.MADV_NOHUGEPAGE)
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
sys.stdin.readline()
for i in range(0, 4 << 20, 4096):
    m[i] = 1
print("done", flush=True)
sys.stdin.readline()
"""


def test_shared_ring_and_mem_sample_layout_live_on_software_page_faults():
    """The software page-faults event with PERF_SAMPLE_ADDR (what `perf record -e
    page-faults -d` opens) sampled with the pmu primitive's own sample_type: Ring +
    SampleParser see exactly one sample per first-touched page, with the right address,
    thread and time, and data_src at the kernel's 'not available' default."""
    child = subprocess.Popen([sys.executable, "-c", TOUCH], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        base = int(child.stdout.readline())
        attr = PerfEventAttr()
        attr.type = PERF_TYPE_SOFTWARE
        attr.size = ctypes.sizeof(PerfEventAttr)
        attr.config = 2  # PERF_COUNT_SW_PAGE_FAULTS
        attr.sample_period = 1
        attr.sample_type = pmu.MEM_SAMPLE
        attr.flags = 1 << 25  # use_clockid (enabled at once)
        attr.clockid = 1
        attr.wakeup_events = 1
        try:
            fd = perf_event_open(attr, child.pid, -1)
        except OSError as e:
            pytest.skip(f"perf_event_open of a software event failed: {e}")
        ring = Ring(fd, 256)
        t0 = time.monotonic_ns()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        t1 = time.monotonic_ns()
        parser = SampleParser(DT)
        recs = parser.parse(ring.take())
        ring.close()
        os.close(fd)
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(10)
    inside = recs[(recs["addr"] >= base) & (recs["addr"] < base + (4 << 20))]
    pages = np.unique(inside["addr"] // 4096)
    assert parser.lost == 0
    assert pages.size == 1024 and inside.size == 1024, (pages.size, inside.size)
    assert (inside["pid"] == child.pid).all() and (inside["tid"] == child.pid).all()
    assert ((inside["time"] >= t0) & (inside["time"] <= t1)).all()
    assert np.isin(inside["cpu"], list(os.sched_getaffinity(0))).all()
    store, load, level = pm.decode(inside["data_src"])
    assert not store.any() and not load.any() and (level == MEM_IDS["unknown"]).all()
