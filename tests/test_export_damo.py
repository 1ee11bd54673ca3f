"""``udamon export --format damo``: the real damo (DAMON's user-space tool, 3.4.3 from
PyPI) reads the converted record, and its ``report access``, ``report heatmap`` and
``report wss`` agree with udamon's own view of the same record."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import run_udamon

from udamon.primitives.synthetic import DEMO_BUFFERS
from udamon.record.reader import read_record

DAMO_VERSION = "3.4.3"
MiB = 1 << 20
BASE = 0x7F00_0000_0000


def _buffer(name):
    lo, hi = DEMO_BUFFERS[name]
    return BASE + lo * MiB, BASE + hi * MiB


def _find_damo(tmp_dir) -> tuple[list[str] | None, str]:
    exe = os.path.join(os.path.dirname(sys.executable), "damo")
    if os.access(exe, os.X_OK):
        return [exe], ""
    spec = importlib.util.find_spec("damo")
    if spec is not None and spec.submodule_search_locations:
        return [sys.executable, os.path.join(spec.submodule_search_locations[0], "damo.py")], ""
    # not installed with the test extras: fetch it from PyPI into a scratch directory
    try:
        p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--target", str(tmp_dir), f"damo=={DAMO_VERSION}"],
                           capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot install damo=={DAMO_VERSION}: {e}"
    script = os.path.join(str(tmp_dir), "damo", "damo.py")
    if p.returncode != 0 or not os.path.exists(script):
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"cannot install damo=={DAMO_VERSION} from PyPI: {last}"
    return [sys.executable, script], ""


@pytest.fixture(scope="module")
def damo(tmp_path_factory):
    if shutil.which("file") is None:
        pytest.skip("damo detects a record file's type with the 'file' command, which is not "
                    "installed (Debian package 'file')")
    cmd, why = _find_damo(tmp_path_factory.mktemp("damo"))
    if cmd is None:
        pytest.skip(why)
    v = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
    if v.returncode != 0:
        pytest.skip(f"damo does not run: {(v.stderr or v.stdout).strip()[-200:]}")
    if v.stdout.strip() != DAMO_VERSION:
        pytest.skip(f"damo {v.stdout.strip()} is installed; this test targets {DAMO_VERSION}")

    def run(*args: str) -> str:
        p = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
        # damo reports errors on stdout and exits 1
        assert p.returncode == 0, f"damo {' '.join(args)} failed ({p.returncode}):\n" \
                                  f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p.stdout

    return run


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    csv, rec = d / "acc.csv", d / "rec.jsonl"
    run_udamon("synth", "-o", str(csv), "--duration", "3s", check=True)
    run_udamon("record", "--input", str(csv), "-q", "--seed", "3", "--probe", "reads=read",
               "-o", str(rec),
               check=True)
    return rec


@pytest.fixture(scope="module")
def out(rec, tmp_path_factory):
    out = tmp_path_factory.mktemp("damo-out") / "damon.data"
    p = run_udamon("export", "--format", "damo", "-i", str(rec), "-o", str(out), check=True)
    assert "30 snapshots" in p.stderr
    return out


@pytest.fixture(scope="module")
def udamon_view(rec):
    doc = json.loads(run_udamon("report", "access", "-i", str(rec), "--format", "json",
                                "--snapshot", "all", check=True).stdout)
    (target,) = doc["targets"]
    return target["snapshots"]


def _damo_access(damo, path):
    """damo's report access in a parseable form: per snapshot (start_ns, end_ns, regions),
    each region [start, end, access_hz, age_us, *probe_hits]."""
    text = damo("report", "access", "-i", str(path), "--raw_number",
                "--format", "set", "record_head", "target <target id> <intervals>",
                "--format", "set", "snapshot_head", "snapshot <abs start time> <abs end time>",
                "--format", "set", "region",
                "region <start address> <end address> <access hz> <age> <probe hits>",
                "--format", "set", "snapshot_tail", "",
                "--format", "set", "record_tail", "")
    heads, snaps = [], []
    for ln in text.splitlines():
        f = ln.split()
        if not f:
            continue
        if f[0] == "target":
            heads.append(ln)
        elif f[0] == "snapshot":
            snaps.append((int(f[1]), int(f[2]), []))
        elif f[0] == "region":
            snaps[-1][2].append([int(f[1]), int(f[2]), float(f[3]), int(f[4]),
                                 *map(int, f[5:])])
    return heads, snaps


def _mean(regions, lo, hi, col):
    vals, sizes = [], []
    for r in regions:
        s, e = max(r[0], lo), min(r[1], hi)
        if e > s:
            vals.append(r[col])
            sizes.append(e - s)
    assert sizes
    return float(np.average(vals, weights=sizes))


def test_report_access_agrees_with_udamon(damo, out, udamon_view):
    heads, snaps = _damo_access(damo, out)
    assert heads == ["target 4242 sample 5000, aggr 100000"]
    assert len(snaps) == len(udamon_view) == 30
    for (t0, t1, regions), u in zip(snaps, udamon_view, strict=True):
        assert t1 == u["time_ns"] and t1 - t0 == u["aggr_us"] * 1000
        mine = [[r["start"], r["end"], r["nr_accesses"], r["age"], r["probes"]["reads"]]
                for r in u["regions"]]
        theirs = [[s, e, round(hz * u["aggr_us"] / 1e6), age_us // u["aggr_us"], *hits]
                  for s, e, hz, age_us, *hits in regions]
        assert theirs == mine
    # ground truth, read from damo's output: W is written all the time, I idles after 200 ms
    last = snaps[-1][2]
    w_hz, i_hz = _mean(last, *_buffer("W"), 2), _mean(last, *_buffer("I"), 2)
    assert w_hz >= 180 and i_hz == 0  # max 200 Hz: 20 samples per 100 ms
    assert _mean(last, *_buffer("I"), 3) >= 25 * 100_000  # idle (age in us) since ~300 ms
    # the probe (reads) counts R and S, not W
    assert _mean(last, *_buffer("R"), 4) >= 18 and _mean(last, *_buffer("W"), 4) == 0


def test_report_access_default_text(damo, out):
    text = damo("report", "access", "-i", str(out))
    assert "intervals: sample 5 ms aggr 100 ms" in text
    assert "probe_hits" in text and "total size:" in text


def test_report_heatmap(damo, out):
    ascii_map = damo("report", "heatmap", "-i", str(out))  # default: stdout, in colours
    rows = [ln for ln in ascii_map.splitlines() if "\x1b[" in ln]
    assert len(rows) >= 10

    def mean_heat(name):
        raw = damo("report", "heatmap", "-i", str(out), "--output", "raw",
                   "--address_range", *map(str, _buffer(name)), "--resol", "30", "8")
        heats = [float(ln.split()[2]) for ln in raw.splitlines() if ln.strip()]
        assert len(heats) == 30 * 8
        return float(np.nanmean(heats))

    w, i = mean_heat("W"), mean_heat("I")
    assert w > 150 and w > 3 * i, (w, i)


def test_report_wss(damo, out, rec):
    text = damo("report", "wss", "-i", str(out))
    assert "<percentile> <wss>" in text
    raw = damo("report", "wss", "-i", str(out), "--exclude_samples", "0", "--raw_number",
               "--all_wss", "--sortby", "time")
    damo_wss = [int(ln.split()[1]) for ln in raw.splitlines() if ln and not ln.startswith("#")]
    r = read_record(str(rec))
    mine = [int((s.end - s.start)[s.nr_accesses >= 1].sum()) for s in r.snapshots]
    assert damo_wss == mine
    # W, R and S (40 MiB) are the working set once I has gone idle (regions may
    # straddle a buffer's edge by a little)
    assert 36 * MiB <= np.median(mine[5:]) <= 41 * MiB


def test_json_and_compressed_are_the_same_records(rec, out, tmp_path):
    plain = tmp_path / "damon.json"
    run_udamon("export", "--format", "damo", "--damo-type", "json", "-i", str(rec),
               "-o", str(plain), "--pid", "4242", check=True)
    doc = json.loads(plain.read_bytes())
    assert doc == json.loads(zlib.decompress(out.read_bytes()))
    (r,) = doc
    assert r["target_id"] == 4242 and r["kdamond_idx"] == 0 and r["context_idx"] == 0
    assert r["intervals"]["sample_us"] == "5000" and r["intervals"]["aggr_us"] == "100000"
    reg = r["snapshots"][-1]["regions"][0]
    assert set(reg) == {"start", "end", "nr_accesses", "age", "probe_hits", "sz_filter_passed"}
    assert set(reg["nr_accesses"]) == {"samples", "percent"}
    assert set(reg["age"]) == {"usec", "aggr_intervals"}


@pytest.mark.parametrize("args, msg", [
    (["--format", "perf"], "invalid choice"),
    (["--pid", "1"], "--pid 1 is not a target"),
    (["--damo-type", "yaml"], "invalid choice"),
])
def test_bad_usage_is_one_line(rec, tmp_path, args, msg):
    p = run_udamon("export", *(["--format", "damo"] if "--format" not in args else []), *args,
                   "-i", str(rec), "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and msg in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_input_and_output_are_one_line(rec, tmp_path):
    for args, msg in [
        (["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o")], "no such file"),
        (["-i", str(rec), "-o", str(tmp_path)], "is a directory"),
        (["-i", str(rec), "-o", str(tmp_path / "nodir" / "o")], "cannot write"),
        (["-i", str(rec), "-o", str(rec)], "is the input record"),
    ]:
        p = run_udamon("export", "--format", "damo", *args)
        assert p.returncode == 2 and msg in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something-else"}\n')
    p = run_udamon("export", "--format", "damo", "-i", str(bad), "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and "not a udamon record" in p.stderr


def test_record_without_snapshots(rec, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(rec.read_text().splitlines()[0] + "\n")
    p = run_udamon("export", "--format", "damo", "-i", str(empty), "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and "nothing to export" in p.stderr
    assert "incomplete" in p.stderr  # the warning, then the error
