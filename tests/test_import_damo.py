"""damo records in (src/udamon/record/damo_import.py): every udamon report reads damo's files.

Round trips with the real damo 3.4.3 (test extras): a udamon record exported for
damo, converted by damo itself into its other formats (json, perf_script), and
read back keeps every region, nr_accesses, age and probe hit; damo's snapshot
records and its .kdamonds file (damo's human number forms), the kernel's own
tracepoint text with probe hits, and broken files.  A damo record of a real
kernel session (perf on the damon tracepoints) is read in the Linux 7.3 guest:
tests/test_kernel_guest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib

import numpy as np
import pytest
from conftest import run_udamon
from test_export_damo import _find_damo

from udamon.record.damo_import import sniff
from udamon.record.reader import read_record


@pytest.fixture(scope="module")
def damo(tmp_path_factory):
    if shutil.which("file") is None:
        pytest.skip("damo detects a record file's type with the 'file' command (not installed)")
    cmd, why = _find_damo(tmp_path_factory.mktemp("damo"))
    if cmd is None:
        pytest.skip(why)

    def run(*args: str) -> str:
        p = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"damo {' '.join(args)}: {p.stdout[-1500:]}{p.stderr[-1500:]}"
        return p.stdout

    return run


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    csv, out = d / "a.csv", d / "rec.jsonl"
    run_udamon("synth", "-o", str(csv), "--duration", "2s", check=True)
    run_udamon("record", "--input", str(csv), "-q", "--seed", "5", "--probe", "r=read",
               "--probe", "w=write", "-o", str(out), check=True)
    return out


def _same(a, b, probes=True, time_tol_ns=0) -> None:
    """Two records hold the same snapshots: times, regions, counts, ages (and probes)."""
    assert len(a.snapshots) == len(b.snapshots)
    for x, y in zip(a.snapshots, b.snapshots, strict=True):
        assert (x.pid, x.sample_us) == (y.pid, y.sample_us)
        assert abs(x.time_ns - y.time_ns) <= time_tol_ns
        for f in ("start", "end", "nr_accesses", "age"):
            assert np.array_equal(getattr(x, f), getattr(y, f)), f
        if probes:
            assert [h.tolist() for h in x.probe_hits.values()] == \
                [h.tolist() for h in y.probe_hits.values()]


def test_udamon_to_damo_to_udamon_keeps_regions_and_counts(rec, tmp_path):
    orig = read_record(str(rec))
    data = tmp_path / "damon.data"
    run_udamon("export", "--format", "damo", "-i", str(rec), "-o", str(data), check=True)
    assert sniff(str(data)) == "json_compressed"
    back = read_record(str(data))  # what every 'udamon report -i damon.data' does
    _same(orig, back)
    assert back.pids == orig.pids and back.attrs.sample_us == orig.attrs.sample_us
    assert back.attrs.aggr_us == orig.attrs.aggr_us and back.probe_names == ["probe0", "probe1"]
    assert back.snapshots[1].start_ns == orig.snapshots[1].start_ns
    assert back.header["input_format"] == "damo-json_compressed" and back.complete
    # 'udamon import' writes it as a udamon record that reads back the same
    out = tmp_path / "imported.jsonl"
    p = run_udamon("import", "-i", str(data), "-o", str(out), check=True)
    assert f"{len(orig.snapshots)} snapshots" in p.stderr
    _same(orig, read_record(str(out)))
    # and every report kind reads damo's file directly
    for kind, args in (("access", ["--snapshot", "sum"]), ("heatmap", []), ("wss", []),
                       ("ksm", []), ("dirty", [])):
        r = run_udamon("report", kind, "-i", str(data), *args)
        # probes are positional in damo: 'write' is probe1 there, so ksm and dirty say
        # they cannot tell writes apart, in one line
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, (kind, r.stderr)
        if kind in ("access", "heatmap", "wss"):
            assert r.returncode == 0, (kind, r.stderr)


def test_damos_own_conversions_read_back(rec, tmp_path, damo):
    """damo converts udamon's export into json and perf_script; both read back the same
    (perf_script has no probe hits nor intervals: those are inferred and said so)."""
    orig = read_record(str(rec))
    data = tmp_path / "damon.data"
    run_udamon("export", "--format", "damo", "-i", str(rec), "-o", str(data), check=True)
    js, ps = tmp_path / "d.json", tmp_path / "d.perf_script"
    damo("convert_record_format", "--record_file", str(data), "--format", "json",
         "--output_file", str(js))
    damo("convert_record_format", "--record_file", str(data), "--format", "perf_script",
         "--output_file", str(ps))
    assert sniff(str(js)) == "json" and sniff(str(ps)) == "perf_script"
    _same(orig, read_record(str(js)))
    txt = read_record(str(ps))
    _same(orig, txt, probes=False, time_tol_ns=1000)  # perf script prints microseconds
    assert txt.probe_names == [] and txt.attrs.aggr_us == 100_000 and txt.attrs.sample_us == 5000
    assert any("no monitoring intervals" in n for n in txt.header["notes"])
    # the other way: udamon's import of damo's file exports again into what damo reads
    back = tmp_path / "again.data"
    run_udamon("export", "--format", "damo", "-i", str(js), "-o", str(back), check=True)
    a = damo("report", "access", "-i", str(back), "--raw_number", "--format", "set", "region",
             "<start address> <end address> <access hz> <age>")
    b = damo("report", "access", "-i", str(data), "--raw_number", "--format", "set", "region",
             "<start address> <end address> <access hz> <age>")
    assert a == b


def _snap(t, regions, probes=None):
    return {"start_time": str(t - 100_000_000), "end_time": str(t),
            "regions": [{"start": str(s), "end": str(e),
                         "nr_accesses": {"samples": n, "percent": None},
                         "age": {"usec": None, "aggr_intervals": str(g)},
                         **({"probe_hits": probes[i]} if probes else {}),
                         "sz_filter_passed": "0"} for i, (s, e, n, g) in enumerate(regions)],
            "total_bytes": None, "damos_stats": None, "sample_interval_us": None}


def test_snapshot_mode_records_and_the_kdamonds_file(tmp_path):
    """damo record --snapshot writes one record per snapshot (target_id null, the
    scheme's tried regions); its .kdamonds file has the pid and intervals in damo's
    human forms ("5 ms", "1,000", "0 %")."""
    recs = [{"kdamond_idx": 0, "context_idx": 0, "intervals": None, "scheme_idx": 0,
             "target_id": None, "scheme_filters": [], "data_source": "unknown",
             "snapshots": [_snap(t, [(4096, 8192, k, 3), (8192, 65536, 0, 9)])]}
            for k, t in ((4, 10**9), (7, 2 * 10**9), (1, 3 * 10**9))]
    data = tmp_path / "snap.data"
    data.write_bytes(zlib.compress(json.dumps(recs).encode()))
    (tmp_path / "snap.data.kdamonds").write_text(json.dumps([{"contexts": [{
        "ops": "vaddr", "targets": [{"pid": 4321, "regions": []}],
        "intervals": {"sample_us": "2 ms", "aggr_us": "40 ms", "ops_update_us": "1 s",
                      "intervals_goal": {"access_bp": "0 %", "aggrs": "0",
                                         "min_sample_us": "0 ns", "max_sample_us": "0 ns"}},
        "nr_regions": {"min": "20", "max": "1,000"}}]}]))
    r = read_record(str(data))
    assert r.pids == [4321] and len(r.snapshots) == 3
    assert [int(s.nr_accesses[0]) for s in r.snapshots] == [4, 7, 1]
    assert r.attrs.sample_us == 2000 and r.attrs.aggr_us == 40000
    assert r.attrs.min_nr_regions == 20 and r.attrs.max_nr_regions == 1000
    assert "scheme 0 tried regions" in r.header["targets"][0]["name"]


# the kernel's tracepoints as 'perf script' prints them (the print fmt of Linux 7.3)
_K = " kdamond.0   158 [001]   {t}: damon:{ev}: target_id=0 nr_regions=2 {rest}\n"
PERF_TEXT = "".join(_K.format(t=t, ev=ev, rest=rest) for t, ev, rest in (
    ("100.000000100", "damon_region_aggregated", "4096-8192: 20 1 probe_hits=14 00"),
    ("100.000000200", "damon_region_aggregated", "8192-65536: 0 7 probe_hits=00 14"),
    ("100.000000150", "damon_aggregated", "4096-8192: 20 1"),
    ("100.100000100", "damon_region_aggregated", "4096-8192: 19 2 probe_hits=13 01"),
    ("100.100000200", "damon_region_aggregated", "8192-65536: 1 0 probe_hits=00 14"),
    ("100.200000100", "damon_region_aggregated", "4096-8192: 19 2 probe_hits=13 01"),
))


def test_kernel_tracepoint_text_with_probe_hits(tmp_path):
    f = tmp_path / "trace.txt"
    f.write_text(PERF_TEXT)
    r = read_record(str(f))
    assert r.probe_names == ["probe0", "probe1"] and len(r.snapshots) == 2
    s0, s1 = r.snapshots
    assert s0.time_ns == 100_000_000_100 and s1.time_ns == 100_100_000_100
    assert s0.nr_accesses.tolist() == [20, 0] and s0.age.tolist() == [1, 7]
    assert s0.probe_hits["probe0"].tolist() == [20, 0]
    assert s1.probe_hits["probe1"].tolist() == [1, 20]
    assert any("incomplete snapshot" in n for n in r.header["notes"])  # the cut-off last one


@pytest.mark.parametrize("content, msg", [
    (zlib.compress(b"[{]")[:-3] + b"xx", "compressed data is corrupted"),
    (b"[1, 2]", "must be an object with 'snapshots'"),
    (b"[]", "holds no damo records"),
    (json.dumps([{"target_id": 1, "snapshots": [_snap(10**9, [(0, 8192, 1, 0),
                                                               (4096, 9000, 0, 0)])]}]).encode(),
     "overlaps the one before it"),
    (json.dumps([{"target_id": 1, "snapshots": [_snap(10**9, [(8192, 4096, 1, 0)])]}]).encode(),
     "must be above start"),
    (b" kdamond.0 1 [000] 5.0: damon:damon_aggregated: garbage\n", "no DAMON tracepoint lines"),
])
def test_bad_damo_files_are_one_line(tmp_path, content, msg):
    f = tmp_path / "bad.data"
    f.write_bytes(content)
    r = run_udamon("report", "access", "-i", str(f))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr


def test_import_refuses_what_is_not_damo(rec, tmp_path):
    r = run_udamon("import", "-i", str(rec), "-o", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and "not a damo record file" in r.stderr
    r = run_udamon("import", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such file" in r.stderr
    assert not os.path.exists(tmp_path / "o.jsonl")
