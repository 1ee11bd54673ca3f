"""`udamon record --input FILE --input-format perf-script`: perf's own data as reports.

Two kinds of evidence:

* real ``perf`` (Debian's linux-perf) on the pinned reader/writer workload with
  NUMA balancing on: the software ``page-faults`` event recorded with ``-d
  --sample-cpu`` and the ``exceptions:page_fault_user`` tracepoint, imported, must
  give the same per-buffer CPU attribution as the ``hint`` primitive recording the
  same run, and that attribution must be the pinned truth;
* ``perf script`` text constructed with the field layouts of tools/perf/
  builtin-script.c (``%7d/%-7d``, ``[%03d]``, ``%5lu.%09llu:``, ``%16lx`` for addr
  and data_src, its decoded ``|OP ..|BLK ..`` text, ``%16lu`` weight) for PEBS, IBS
  and SPE memory samples, whose data_src values the test chooses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import buffer_hits, buffers_span, run_udamon, share, start_workload

from udamon.primitives import perf_mem as pm
from udamon.record.reader import read_record

MS = 1_000_000
NUMA = "/proc/sys/kernel/numa_balancing"


def sample_line(pid, tid, cpu, t_ns, event, addr, ds=None, decoded="", weight=None,
                comm="app", sym=" 401136 main+0x26"):
    """One line as perf script prints it (process_event's order and formats)."""
    s = f"{comm:>16s} {pid:7d}/{tid:<7d} [{cpu:03d}] {t_ns // 10**9:5d}.{t_ns % 10**9:09d}: "
    s += f"{event:>24s}: {addr:16x}"
    if ds is not None:
        s += f"{ds:16x} {decoded}".ljust(80)
    if weight is not None:
        s += f"{weight:16d}"
    return s + sym


LOAD_L1 = pm.data_src_value(pm.OP_LOAD, pm.LVL_L1 | pm.LVL_HIT, pm.LVLNUM_L1, snoop=0x2)
STORE_L1 = pm.data_src_value(pm.OP_STORE, pm.LVL_L1 | pm.LVL_HIT, pm.LVLNUM_L1)
LOAD_LOCAL_RAM = pm.data_src_value(pm.OP_LOAD, pm.LVL_LOC_RAM | pm.LVL_HIT, pm.LVLNUM_RAM)
LOAD_REMOTE_RAM = pm.data_src_value(pm.OP_LOAD, pm.LVL_REM_RAM1 | pm.LVL_HIT, pm.LVLNUM_RAM,
                                    remote=1)
# AMD IBS fills only the composite fields: lvl_num + remote + hops
IBS_REMOTE_RAM = pm.data_src_value(pm.OP_LOAD, 0, pm.LVLNUM_RAM, remote=1, hops=2)
IBS_SAME_NODE_CACHE = pm.data_src_value(pm.OP_LOAD, 0, pm.LVLNUM_ANY_CACHE, remote=1,
                                        hops=pm.HOPS_0)
# Arm SPE as perf synthesises it (arm_spe__synth_data_source): old lvl bits
SPE_REMOTE_CACHE = pm.data_src_value(pm.OP_LOAD, pm.LVL_REM_CCE1 | pm.LVL_HIT, 0, remote=1)
SPE_STORE = pm.data_src_value(pm.OP_STORE, pm.LVL_NA, 0)
NOT_MEMORY = pm.data_src_value(pm.OP_NA, pm.LVL_NA, 0)

DECODED = {
    LOAD_L1: "|OP LOAD|LVL L1 hit|SNP None|TLB L1 or L2 hit|LCK No|BLK  N/A",
    STORE_L1: "|OP STORE|LVL L1 hit|SNP N/A|TLB N/A|LCK N/A|BLK  N/A",
    LOAD_LOCAL_RAM: "|OP LOAD|LVL Local RAM or RAM hit|SNP None|TLB L2 miss|LCK No|BLK  N/A",
    LOAD_REMOTE_RAM: "|OP LOAD|LVL Remote RAM (1 hop) or RAM hit|SNP Hit|TLB L2 miss|LCK No|"
                     "BLK  N/A",
    IBS_REMOTE_RAM: "|OP LOAD|LVL Remote node, same socket RAM hit|SNP N/A|TLB L2 miss|"
                    "LCK No|BLK  N/A",
    IBS_SAME_NODE_CACHE: "|OP LOAD|LVL Remote core, same node Any cache hit|SNP N/A|"
                         "TLB L1 or L2 hit|LCK No|BLK  N/A",
    SPE_REMOTE_CACHE: "|OP LOAD|LVL Remote Cache (1 hop) hit|SNP N/A|TLB N/A|LCK N/A|"
                      "BLK  N/A",
    SPE_STORE: "|OP STORE|LVL N/A|SNP N/A|TLB N/A|LCK N/A|BLK  Data",
    NOT_MEMORY: "|OP N/A|LVL N/A|SNP N/A|TLB N/A|LCK N/A|BLK  N/A",
}


def test_data_src_decoding():
    store, load, level = pm.decode(list(DECODED))
    names = ["cache", "cache", "ram", "remote-ram", "remote-ram", "cache", "remote-cache",
             "unknown", "unknown"]
    from udamon.intake.reports import MEM_LEVELS

    assert [MEM_LEVELS[x] for x in level] == names
    assert store.tolist() == [False, True, False, False, False, False, False, True, False]
    assert load.tolist() == [True, False, True, True, True, True, True, False, False]
    # a miss at a level names no level; I/O is "other"
    _, _, lv = pm.decode([pm.data_src_value(pm.OP_LOAD, pm.LVL_L2 | pm.LVL_MISS),
                          pm.data_src_value(pm.OP_LOAD, 0, pm.LVLNUM_IO)])
    assert [MEM_LEVELS[x] for x in lv] == ["unknown", "other"]


def test_constructed_pebs_ibs_spe_samples(tmp_path):
    """Each kind of sample lands in its own 64 KiB range (with gaps between them, so no
    region spans two): in each range every hit must come from the kind's CPU, be a
    load or a store as its data_src says, and have its memory level."""
    base = 0x7F0000000000
    kinds = [(LOAD_L1, 0, "cpu/mem-loads,ldlat=30/P"), (STORE_L1, 1, "cpu/mem-stores/P"),
             (LOAD_LOCAL_RAM, 0, "cpu/mem-loads,ldlat=30/P"),
             (LOAD_REMOTE_RAM, 1, "cpu/mem-loads,ldlat=30/P"), (IBS_REMOTE_RAM, 0, "ibs_op//"),
             (IBS_SAME_NODE_CACHE, 1, "ibs_op//"), (SPE_REMOTE_CACHE, 0, "memory"),
             (SPE_STORE, 1, "memory")]
    lines, t = [], 1_000_000_000
    for rep in range(4):
        for k, (ds, cpu, ev) in enumerate(kinds):
            t += 10 * MS
            addr = base + k * 0x20000 + rep * 0x1000 + 0x48  # sub-page: kept exactly
            lines.append(sample_line(100, 101 + cpu, cpu, t, ev, addr, ds, DECODED[ds],
                                     weight=50 + 100 * k))
        t += 10 * MS
        lines.append(sample_line(100, 101, 0, t, "ibs_op//", base + 0x1000, NOT_MEMORY,
                                 DECODED[NOT_MEMORY], weight=0))
        lines.append(sample_line(100, 101, 0, t, "ibs_op//", 0xFFFFFFFF81000000, LOAD_L1,
                                 DECODED[LOAD_L1], weight=7))
    f = tmp_path / "mem.txt"
    f.write_text("# ========\n# captured on: test\n" + "\n".join(lines) + "\n")
    rec_path = tmp_path / "r.jsonl"
    ranges = [a for k in range(len(kinds))
              for a in ("--range", f"{base + k * 0x20000:#x}-{base + k * 0x20000 + 0x10000:#x}")]
    p = run_udamon("record", "--input", str(f), "--input-format", "perf-script", *ranges,
                   "--regions", "8,100", "--breakdown", "cpu,rw", "--probe", "pmu=source:pmu",
                   "--probe", "rr=mem:remote-ram", "--probe", "rc=mem:remote-cache",
                   "--probe", "local=mem:local", "--seed", "1", "-o", str(rec_path))
    assert p.returncode == 0, p.stderr
    rec = read_record(str(rec_path))
    assert rec.header["input_format"] == "perf-script" and rec.coverage == "unknown"
    assert rec.end["reports"] == 4 * len(kinds)
    notes = " ".join(rec.end["notes"])
    assert "4 samples with a kernel address" in notes and "4 memory samples that were " \
        "neither" in notes and "24 loads, 8 stores" in notes
    want = {  # kind: (cpu, write, level probe)
        0: (0, 0, "local"), 1: (1, 1, "local"), 2: (0, 0, "local"), 3: (1, 0, "rr"),
        4: (0, 0, "rr"), 5: (1, 0, "local"), 6: (0, 0, "rc"), 7: (1, 1, None)}
    for k, (cpu, write, level) in want.items():
        h = buffer_hits(rec, base + k * 0x20000, base + k * 0x20000 + 0x10000)
        n = h["nr_accesses"]  # (merged regions average their counts: compare, not count)
        assert n > 0 and h["pmu"] == n and h[f"cpu:{cpu}"] == n and h[f"cpu:{1 - cpu}"] == 0, \
            (k, h)
        assert h["write" if write else "read"] == n and h["read" if write else "write"] == 0
        for probe in ("local", "rr", "rc"):
            assert h[probe] == (n if probe == level else 0), (k, probe, h)


@pytest.mark.parametrize("text,msg", [
    ("", "empty file"),
    ("   app  100/101   123.000000001: page-faults:  7f0000001000\n", "PID/TID [CPU] TIME"),
    ("   app  100/101 [000]   123.000000001: page-faults:\n", "has no address"),
    ("   app  100/101 [000]   123.000000002: page-faults:  7f0000001000\n"
     "   app  100/101 [000]   123.000000001: page-faults:  7f0000002000\n", "backwards"),
])
def test_bad_perf_script_input_is_exit_2(tmp_path, text, msg):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    p = run_udamon("record", "--input", str(f), "--input-format", "perf-script", "-o",
                   str(tmp_path / "r.jsonl"))
    assert p.returncode == 2, p.stderr
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ------------------------------------------------------------------ real perf, real hint


def _hint_ok():
    try:
        from udamon.primitives.hint import hint_available

        return hint_available()
    except Exception as e:  # pragma: no cover
        return False, str(e)


_ok, _why = _hint_ok()


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf (Debian linux-perf) not installed")
@pytest.mark.skipif(not _ok, reason=f"hint primitive unavailable: {_why}")
@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")
def test_perf_page_faults_and_tracepoint_match_hint_and_the_truth(tmp_path, access_pattern_bin):
    """One run of the pinned workload, seen three ways at once: udamon's hint
    primitive, `perf record -e page-faults -c 1 -d --sample-cpu -p PID` and `perf record
    -e exceptions:page_fault_user -p PID`.  All three must attribute the reader's
    buffer to CPU 0 and the writer's to CPU 1 (the pinning)."""
    from udamon.system.sysctl_guard import SettingsGuard, apply_tracefs

    numa_before = Path(NUMA).read_text().strip()
    wl, info = start_workload(access_pattern_bin, "--duration", "40", "--size", "16")
    guard = SettingsGuard(handle_signals=False)
    perfs: list[subprocess.Popen] = []
    try:
        apply_tracefs(guard)  # perf looks the tracepoint up in tracefs
        span = buffers_span(info)
        hint_rec = tmp_path / "hint.jsonl"
        hint = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                                 "--pid", str(info["pid"]), "--range", span, "--regions",
                                 "64,1000", "--breakdown", "cpu", "--duration", "9s", "-q",
                                 "-o", str(hint_rec)], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 15
        while Path(NUMA).read_text().strip() == "0" and time.time() < deadline:
            time.sleep(0.05)  # balancing is on once the hint session has started
        time.sleep(0.3)
        pf, tp = tmp_path / "pf.data", tmp_path / "tp.data"
        for out, ev in ((pf, ["-e", "page-faults", "-c", "1", "-d", "--sample-cpu"]),
                        (tp, ["-e", "exceptions:page_fault_user"])):
            perfs.append(subprocess.Popen(["perf", "record", "-q", *ev, "-p", str(info["pid"]),
                                           "-o", str(out), "--", "sleep", "7"],
                                          stderr=subprocess.PIPE, text=True))
        _, herr = hint.communicate(timeout=90)
        assert hint.returncode == 0, herr
        for pr in perfs:
            _, err = pr.communicate(timeout=60)
            assert pr.returncode == 0, err
    finally:
        for pr in perfs:
            if pr.poll() is None:
                pr.kill()
        guard.restore()
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"
    assert Path(NUMA).read_text().strip() == numa_before
    texts = {}
    for name, data, fields in (("pf", pf, "pid,tid,cpu,time,event,addr"),
                               ("tp", tp, "pid,tid,cpu,time,event,trace")):
        txt = tmp_path / f"{name}.txt"
        with open(txt, "w") as f:
            r = subprocess.run(["perf", "script", "-i", str(data), "-F", fields, "--ns"],
                               stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        texts[name] = txt
    recs = {"hint": read_record(str(hint_rec))}
    for name, txt in texts.items():
        out = tmp_path / f"{name}.jsonl"
        p = run_udamon("record", "--input", str(txt), "--input-format", "perf-script",
                       "--pid", str(info["pid"]), "--range", span, "--regions", "64,1000",
                       "--breakdown", "cpu,rw", "-o", str(out), timeout=300)
        assert p.returncode == 0, p.stderr
        recs[name] = read_record(str(out))
    summary = {}
    for name, rec in recs.items():
        h = {k: buffer_hits(rec, *info[k]) for k in "RW"}
        summary[name] = {"R_cpu0": share(h["R"], "cpu:0", "cpu:1"),
                         "W_cpu1": share(h["W"], "cpu:1", "cpu:0"),
                         "R_hits": h["R"]["cpu:0"] + h["R"]["cpu:1"],
                         "W_hits": h["W"]["cpu:0"] + h["W"]["cpu:1"]}
        if name == "tp":
            summary[name]["W_writes"] = share(h["W"], "write", "read")
            summary[name]["R_reads"] = share(h["R"], "read", "write")
    print(summary)
    for name, s in summary.items():
        assert s["R_hits"] >= 5 and s["W_hits"] >= 5, (name, s)
        assert s["R_cpu0"] >= 0.95 and s["W_cpu1"] >= 0.95, (name, s)  # the pinned truth
    # the same attribution as hint: the same CPU dominates each buffer
    assert summary["tp"]["W_writes"] >= 0.95 and summary["tp"]["R_reads"] >= 0.95
    assert recs["pf"].end["reports"] > 0 and recs["tp"].end["reports"] > 0
