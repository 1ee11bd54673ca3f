"""The command line end to end, as a user runs it: replay with sample filters and
probes, reports, and one-line errors with exit code 2 for bad input."""

import json

import numpy as np
import pytest
from conftest import run_udamon

from udamon.primitives.synthetic import DEMO_BUFFERS

MiB = 1 << 20
BASE = 0x7F00_0000_0000


@pytest.fixture(scope="module")
def demo_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "acc.csv"
    run_udamon("synth", "-o", str(path), "--duration", "2s", check=True)
    return path


@pytest.fixture(scope="module")
def ok_rec(tmp_path_factory, demo_csv):
    rec = tmp_path_factory.mktemp("rec") / "ok.jsonl"
    run_udamon("record", "--input", str(demo_csv), "-q", "-o", str(rec), check=True)
    return rec


def buffer_mean(regions, name, key):
    """Size-weighted mean of a column over the regions inside a demo buffer."""
    lo, hi = (BASE + x * MiB for x in DEMO_BUFFERS[name])
    vals, sizes = [], []
    for r in regions:
        s, e = max(r["start"], lo), min(r["end"], hi)
        if e > s:
            v = r[key] if key in r else r["probes"][key]
            vals.append(v)
            sizes.append(e - s)
    assert sizes, name
    return float(np.average(vals, weights=sizes))


def test_replay_with_sample_filters_and_two_probes(tmp_path, demo_csv, udamon):
    rec = tmp_path / "rec.jsonl.gz"
    p = udamon("record", "--input", str(demo_csv), "--write-only", "--cpus", "1",
               "--probe", "cpu0=cpus:0", "--probe", "reads=read", "--seed", "7",
               "-o", str(rec), check=True)
    assert "wrote 20 snapshots" in p.stderr
    out = udamon("report", "access", "-i", str(rec), "--format", "json", check=True)
    doc = json.loads(out.stdout)
    assert doc["complete"] and doc["end"]["reason"] == "input-exhausted"
    assert doc["end"]["dropped_reports"] == 0
    assert [x["name"] for x in doc["probes"]] == ["cpu0", "reads"]
    (target,) = doc["targets"]
    regions = target["snapshots"][0]["regions"]
    # ground truth: W is written by CPU 1; S is read by CPU 0 and written by CPU 1;
    # R is only read by CPU 0; I is idle after 200 ms.
    assert buffer_mean(regions, "W", "nr_accesses") >= 18
    assert buffer_mean(regions, "S", "nr_accesses") >= 15
    assert buffer_mean(regions, "R", "nr_accesses") == 0
    assert buffer_mean(regions, "I", "nr_accesses") == 0
    assert buffer_mean(regions, "R", "cpu0") >= 18 and buffer_mean(regions, "W", "cpu0") == 0
    assert buffer_mean(regions, "R", "reads") >= 18 and buffer_mean(regions, "W", "reads") == 0
    assert buffer_mean(regions, "I", "age") >= 100 * 0 + 15  # idle for >= 1.5 s of 2 s

    text = udamon("report", "access", "-i", str(rec), "--sort", "probe:cpu0", "--top", "3",
                  check=True).stdout
    assert "sample filters: write,cpus:1" in text or "sample filters: cpus:1,write" in text
    assert "probe cpu0: cpus:0" in text and "probe reads: read" in text
    table = [ln for ln in text.splitlines() if ln.startswith("  0x")]
    assert len(table) == 3
    for ln in table:  # hottest for cpu0: regions of R or S
        start = int(ln.split()[0], 16)
        assert BASE <= start < BASE + 16 * MiB or BASE + 64 * MiB <= start < BASE + 72 * MiB


def test_all_snapshots_and_ranges(tmp_path, demo_csv, udamon):
    rec = tmp_path / "rec.jsonl"
    lo, hi = BASE + 32 * MiB, BASE + 48 * MiB
    udamon("record", "--input", str(demo_csv), "--range", f"{lo:#x}-{hi:#x}", "--pid", "4242",
           "--regions", "3,20", "-q", "-o", str(rec), check=True)
    doc = json.loads(udamon("report", "access", "-i", str(rec), "--snapshot", "all",
                            "--format", "json", check=True).stdout)
    snaps = doc["targets"][0]["snapshots"]
    assert len(snaps) == 20
    for s in snaps:
        assert s["regions"][0]["start"] == lo and s["regions"][-1]["end"] == hi
        assert len(s["regions"]) <= 20


def test_replay_demo_runs(tmp_path, udamon):
    p = udamon("demo", "--replay", "--dir", str(tmp_path), check=True)
    assert "nr_acc" in p.stdout and "cpu0" in p.stdout and "cpu1" in p.stdout
    assert (tmp_path / "rec.jsonl").exists()


def test_demo_runs_live_when_it_can(tmp_path, udamon):
    from udamon.primitives.hint import hint_available

    ok, why = hint_available()
    if not ok:
        pytest.skip(f"live demo unavailable: {why}")
    p = udamon("demo", "--live", "--dir", str(tmp_path), check=True)
    rows = {}
    for ln in p.stdout.splitlines():
        parts = ln.split()
        if len(parts) >= 5 and parts[0] in "RWSI" and parts[1].isdigit():
            rows[parts[0]] = [int(x) for x in parts[1:5]]  # cpu:0 cpu:1 read write
    assert set(rows) == set("RWSI"), p.stdout
    assert rows["R"][1] == 0 and rows["R"][3] == 0  # R: never CPU 1, never written
    assert rows["W"][0] == 0 and rows["W"][2] == 0  # W: never CPU 0, never read
    assert rows["R"][0] + rows["W"][1] > 0, "no hint faults in 5 s"


BAD_USAGE = [
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--sample", "5"], "bad duration"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--sample", "10ms", "--aggr", "5ms"],
     "aggregation interval"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--regions", "2,1"], "nr_regions"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--cpus", "x"], "bad filter"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--filter", "bogus"], "unknown filter"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--probe", "p=write", "--probe",
      "p=read"], "unique"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--probe", "nameonly"], "NAME=FILTERS"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--range", "5-1"], "bad --range"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--pid", "99"], "no reports"),
    (["record", "-o", "x.jsonl", "--input", "{csv}", "--pid", "abc"], "not a process id"),
    (["record", "-o", "x.jsonl", "--input", "/nonexistent.csv"], "no such file"),
    (["record", "-o", "/nonexistent/dir/x.jsonl", "--input", "{csv}"], "does not exist"),
    (["record", "-o", "x.jsonl", "--primitive", "replay"], "needs --input"),
    (["record", "-o", "x.jsonl", "--intervals-goal", "1,2"], "BP,AGGRS,MIN,MAX"),
    (["report", "access", "-i", "/nonexistent"], "no such file"),
    (["report", "nosuch", "-i", "x"], "invalid choice"),
    (["report", "access", "-i", "{rec}", "--sort", "probe:zz"], "--sort"),
    (["report", "access", "-i", "{rec}", "--snapshot", "99"], "does not exist"),
    (["report", "access", "-i", "{rec}", "--snapshot", "x"], "--snapshot"),
    (["report", "access", "-i", "{rec}", "--pid", "1"], "not a target"),
    (["report", "access", "-i", "{csv}"], "not valid JSON"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,msg", BAD_USAGE)
def test_bad_usage_is_one_line_and_exit_2(tmp_path, demo_csv, ok_rec, udamon, argv, msg):
    argv = [a.format(csv=demo_csv, rec=ok_rec) for a in argv]
    p = udamon(*argv, cwd=tmp_path)
    assert p.returncode == 2, (argv, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert msg in lines[0], lines[0]
    assert "Traceback" not in p.stderr


BAD_CSV = [
    ("", 1, "empty file"),
    ("time_ns,pid,tid,cpu,addr,size\n", 1, "missing write"),
    ("time_ns,pid,tid,cpu,addr,size,write,extra\n", 1, "unknown extra"),
    ("time_ns,pid,tid,cpu,addr,size,write\n1,2,3,0,4096,4096,0\n2,2,3,0,4096,4096\n", 3,
     "expected 7 fields"),
    ("time_ns,pid,tid,cpu,addr,size,write\n1,2,3,0,4096,4096,0\n2,2,3,x,4096,4096,0\n", 3,
     "'cpu': 'x' is not an integer"),
    ("time_ns,pid,tid,cpu,addr,size,write\n1,2,3,0,4096,4096,2\n", 2, "'write'"),
    ("time_ns,pid,tid,cpu,addr,size,write\n1,2,3,0,4096,0,0\n", 2, "'size'"),
    ("time_ns,pid,tid,cpu,addr,size,write\n1,-5,3,0,4096,4096,0\n", 2, "'pid'"),
    ("time_ns,pid,tid,cpu,addr,size,write\n5,2,3,0,4096,4096,0\n\n4,2,3,0,4096,4096,0\n", 4,
     "goes backwards"),
    ("time_ns,pid,tid,cpu,addr,size,write\n5,2,3,0,-1,4096,0\n", 2, "'addr'"),
    ("time_ns,pid,tid,cpu,addr,size,write,source\n5,2,3,0,4096,4096,0,mars\n", 2,
     "unknown source"),
]


@pytest.mark.parametrize("content,line,msg", BAD_CSV)
def test_bad_replay_input_names_the_line(tmp_path, udamon, content, line, msg):
    csv = tmp_path / "in.csv"
    csv.write_text(content)
    p = udamon("record", "--input", str(csv), "-o", str(tmp_path / "r.jsonl"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert f"in.csv:{line}" in lines[0] or line == 1 and "in.csv" in lines[0], lines[0]
    assert msg in lines[0], lines[0]


def test_hex_addresses_and_optional_columns(tmp_path, udamon):
    csv = tmp_path / "in.csv"
    csv.write_text("time_ns,pid,tid,cpu,addr,size,write,node,source\n"
                   "0,9,9,0,0x100000,4096,1,0,hint\n"
                   "1000,9,9,1,0x101000,4096,0,0,hint\n")
    rec = tmp_path / "r.jsonl"
    udamon("record", "--input", str(csv), "--filter", "source:hint", "--probe", "w=write",
           "-q", "-o", str(rec), check=True)
    doc = json.loads(udamon("report", "access", "-i", str(rec), "--format", "json",
                            check=True).stdout)
    regions = doc["targets"][0]["snapshots"][0]["regions"]
    assert regions[0]["start"] == 0x100000 and regions[-1]["end"] == 0x102000
    assert sum(r["nr_accesses"] for r in regions) == 2
    assert sum(r["probes"]["w"] for r in regions) == 1


def test_truncated_record_reports_where_and_salvages(tmp_path, demo_csv, udamon):
    rec = tmp_path / "r.jsonl"
    udamon("record", "--input", str(demo_csv), "-q", "-o", str(rec), check=True)
    data = rec.read_text().splitlines(keepends=True)
    rec.write_text("".join(data[:5]) + data[5][:50])
    p = udamon("report", "access", "-i", str(rec))
    assert p.returncode == 2 and "r.jsonl:6" in p.stderr and "--salvage" in p.stderr
    p = udamon("report", "access", "-i", str(rec), "--salvage")
    assert p.returncode == 0 and "damaged: " in p.stdout and "incomplete" in p.stderr


def _nobody_python() -> list[str] | None:
    """An interpreter user 'nobody' can run with udamon importable (the venv's python
    may live under /root), as the argv prefix; None when there is none."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = f"{src}:{sysconfig.get_paths()['purelib']}"
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for py in (sys.executable, f"/usr/bin/{ver}", f"/usr/local/bin/{ver}"):
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "env", "HOME=/tmp", f"PYTHONPATH={path}", py]
        if os.path.exists(py) and subprocess.run(
                [*argv, "-c", "import numpy, udamon"], capture_output=True,
                cwd="/tmp").returncode == 0:
            return argv
    return None


def test_non_root_on_a_root_pid_hears_it_needs_root():
    """The privilege check comes before reading the target's /proc files, so a user
    monitoring a process they do not own gets the real reason."""
    import subprocess

    argv = _nobody_python()
    if argv is None:
        pytest.skip("needs root, setpriv and a python that user nobody can run")
    p = subprocess.run([*argv, "-m", "udamon", "record", "--primitive", "hint", "--pid", "1",
                        "-o", "/tmp/udamon-nobody.jsonl"], capture_output=True, text=True,
                       cwd="/tmp")
    assert p.returncode == 1, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "needs root" in line and "maps" not in line, line


@pytest.mark.parametrize("cmd,opts", [
    ("record", ["--cpus", "4099"]),
    ("record", ["--filter", "cpus:0+4099"]),
    ("monitor", ["--probe", "far=cpus:4099,write"]),
    ("migrate", ["--filter", "!cpus:4099"]),
])
def test_live_cpus_this_machine_lacks_are_bad_input(tmp_path, udamon, cmd, opts):
    out = ["-o", str(tmp_path / "r.jsonl")] if cmd == "record" else []
    p = udamon(cmd, "--primitive", "hint", "--pid", "1", *out, *opts)
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "no CPU 4099 on this machine (its CPUs: " in line, line


def test_replay_keeps_any_cpu(tmp_path, demo_csv, udamon):
    p = udamon("record", "--input", str(demo_csv), "--cpus", "4099", "-q",
               "-o", str(tmp_path / "r.jsonl"))
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3])
def test_early_ctrl_c_is_one_line_not_a_traceback(tmp_path, demo_csv, delay):
    """Ctrl-C while udamon is still importing (the first ~0.5 s) exits 130 with at most
    one line, like a Ctrl-C at any later time."""
    import os
    import signal
    import subprocess
    import sys
    import time

    exe = os.path.join(os.path.dirname(sys.executable), "udamon")
    argv = [exe] if os.path.exists(exe) else [sys.executable, "-m", "udamon"]
    p = subprocess.Popen([*argv, "record", "--input", str(demo_csv), "-q",
                          "-o", str(tmp_path / "r.jsonl")], stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 1, err
    assert p.returncode in (0, 130), err  # 0: it got far enough to end the record cleanly


@pytest.mark.parametrize("opts,msg", [
    (["--hint-scan-period", "5ms"], "within 10ms..3600s"),
    (["--hint-scan-period", "1.5ms"], "whole milliseconds"),
    (["--hint-scan-period", "soon"], "--hint-scan-period"),
    (["--hint-scan-size", "0"], "within 1..1048576 MiB"),
    (["--hint-scan-size", "1.5"], "whole number of MiB"),
    (["--primitive", "wp", "--hint-scan-size", "64"], "for --primitive hint, not wp"),
])
def test_bad_hint_scan_options(tmp_path, udamon, opts, msg):
    prim = [] if "--primitive" in opts else ["--primitive", "hint"]
    for cmd in ("record", "monitor", "exporter", "migrate"):
        out = ["-o", str(tmp_path / "r.jsonl")] if cmd == "record" else []
        p = udamon(cmd, *prim, "--pid", "1", *out, *opts)
        assert p.returncode == 2, (cmd, p.stderr)
        (line,) = p.stderr.strip().splitlines()
        assert msg in line, (cmd, line)


def test_hint_scan_options_in_help(udamon):
    text = " ".join(udamon("record", "--help").stdout.split())
    assert "--hint-scan-period DUR" in text and "--hint-scan-size MIB" in text
