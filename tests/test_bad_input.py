"""Bad input and bad options found by an audit: each is one line on stderr and exit 2
(never a hang, a traceback or an internal error), and nothing is lost or destroyed."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_udamon

HEADER = "time_ns,pid,tid,cpu,addr,size,write\n"


def csv(tmp_path, body: str, name: str = "in.csv"):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def one_line_error(p, code: int = 2) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    return lines[0]


def end_line(path) -> dict:
    return json.loads(path.read_text().splitlines()[-1])["end"]


def test_time_jump_is_refused_not_a_hang(tmp_path):
    """A time_ns in the wrong unit (or garbage) would close ~10^10 empty intervals."""
    src = csv(tmp_path, "1000,1,1,0,4096,8,1\n1000000000000000000,1,1,0,8192,8,1\n")
    out = tmp_path / "g.jsonl"
    p = run_udamon("record", "--input", str(src), "-o", str(out), timeout=30)
    msg = one_line_error(p)
    assert f"{src}:3: time jumps from 1000 to 1000000000000000000 ns" in msg
    assert "aggregation intervals without a report" in msg and "nanoseconds" in msg
    assert end_line(out)["reason"] == "error"


def test_replay_catch_up_honours_sigterm(tmp_path):
    """1 s of input at 1 us aggregations is 10^6 intervals: SIGTERM ends it cleanly, and
    the snapshots closed so far are in the record already."""
    rows = "".join(f"{i * 1_000_000},1,1,0,{4096 * (1 + i % 50)},8,1\n" for i in range(1001))
    src = csv(tmp_path, rows)
    out = tmp_path / "long.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--input", str(src),
                             "--sample", "1us", "--aggr", "1us", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until snapshots are being written
            if out.exists() and len(out.read_bytes().splitlines()) > 2:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no snapshot written within 30 s")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    end = end_line(out)
    assert end["reason"] == "interrupted"
    assert 0 < end["snapshots"] < 1_000_000


def test_output_that_is_the_input_is_refused(tmp_path):
    src = csv(tmp_path, "1000,1,1,0,4096,8,1\n", name="a.csv")
    before = src.read_text()
    (tmp_path / "link.csv").symlink_to(src)
    for out in (src, tmp_path / "link.csv"):
        msg = one_line_error(run_udamon("record", "--input", str(src), "-o", str(out)))
        assert "is the --input file" in msg
        assert src.read_text() == before


OK_ROWS = "1000,1,1,0,4096,8,1\n200000000,1,1,0,8192,8,0\n"


@pytest.mark.parametrize("args,msg", [
    (["--sample", "0ms"], "must be positive"),
    (["--sample", "0us"], "must be positive"),
    (["--aggr", "0s"], "must be positive"),
    (["--update", "0.0ms"], "must be positive"),
    (["--cpus", "99999999999999999999"], "bad CPU 99999999999999999999"),
    (["--tids", "3000000000"], "bad thread id 3000000000"),
    (["--filter", "nodes:3000000000"], "bad node"),
    (["--probe", "p=pids:99999999999999999999"], "bad process id"),
    (["--pid", "99999999999999999999"], "not a process id"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--cpus", ""], "--cpus needs at least one CPU"),
    (["--tids", " "], "--tids needs at least one thread id"),
    (["--cpus", "", "--tids", ""], "--cpus needs at least one CPU"),
])
def test_bad_options_are_exit_2(tmp_path, args, msg):
    src = csv(tmp_path, OK_ROWS)
    p = run_udamon("record", "--input", str(src), "-o", str(tmp_path / "x.jsonl"), *args)
    assert msg in one_line_error(p)


@pytest.mark.parametrize("args,msg", [
    (["ksm-advise", "--pid", "1", "--top", "x"], "--top: expected a whole number, got 'x'"),
    (["ksm-advise", "--pid", "1", "--top", "0"], "--top: must be at least 1"),
    (["dirty-rate", "--pid", "1", "--sample-pages", "2.5"], "expected a whole number"),
    (["dirty-rate", "--pid", "1", "--sample-pages", "-4"], "must be at least 1"),
])
def test_bad_counts_are_exit_2(args, msg):
    assert msg in one_line_error(run_udamon(*args))


@pytest.mark.parametrize("addr,size,what", [
    ("0xfffffffffffff000", "8", "field 'addr'"),
    ("18446744073709551615", "8", "field 'addr'"),
    ("0xffffffffffffeff9", "8", "ends above"),
    ("4096", "18446744073709551615", "field 'size'"),
])
def test_addresses_in_the_last_page_are_bad_input(tmp_path, addr, size, what):
    src = csv(tmp_path, f"1000,1,1,0,4096,8,1\n2000,1,1,0,{addr},{size},1\n")
    msg = one_line_error(run_udamon("record", "--input", str(src), "-o",
                                    str(tmp_path / "x.jsonl")))
    assert msg.startswith(f"udamon: error: {src}:3: ") and what in msg


def test_the_highest_usable_page_is_fine(tmp_path):
    src = csv(tmp_path, "1000,1,1,0,0xffffffffffffe000,4096,1\n")
    run_udamon("record", "--input", str(src), "-q", "-o", str(tmp_path / "x.jsonl"),
               check=True)


# -- record reader: content no writer produces ------------------------------------------

MS = 1_000_000
BASE = 0x4000_0000


def write_record(path, clock: str | None = None) -> None:
    """Two full aggregations and a shorter last one (a flush), like a live session."""
    import numpy as np

    import udamon
    from udamon import Attrs, Monitor, Probe
    from udamon.record.writer import RecordWriter, build_header

    mon = Monitor(Attrs(min_nr_regions=3, max_nr_regions=6), probes=[Probe.parse("w=write")],
                  seed=1)
    mon.add_target(5, [(BASE, BASE + 12 * 4096)], name="t")
    w = RecordWriter(str(path))
    extra = {"clock": clock} if clock else {}
    w.write_header(build_header(mon.attrs, "replay", "complete", [], mon.probes, mon.targets,
                                **extra))
    mon.start(1000 * MS)
    for k in range(3):
        # a report in every sampling interval: nr_accesses reaches its ceiling
        mon.report_batch(udamon.make_reports(
            time_ns=1000 * MS + k * 100 * MS + np.arange(20) * 5 * MS, pid=5,
            addr=BASE + np.zeros(20, dtype=np.uint64), write=True))
    for s in [*mon.advance(1200 * MS), *mon.flush(1200 * MS + 12 * MS + 500)]:
        w.write_snapshot(s)
    w.close("input-exhausted")


def edit(path, lineno: int, fn) -> None:
    lines = path.read_text().splitlines(keepends=True)
    obj = json.loads(lines[lineno - 1])
    fn(obj)
    lines[lineno - 1] = json.dumps(obj) + "\n"
    path.write_text("".join(lines))


def test_the_writers_record_with_a_short_last_snapshot_is_valid(tmp_path):
    from udamon.record.reader import read_record

    path = tmp_path / "r.jsonl"
    write_record(path, clock="monotonic")
    rec = read_record(str(path))
    assert [int(s.nr_accesses.max()) for s in rec.snapshots] == [20, 20, 3]
    assert rec.snapshots[-1].aggr_us == 12_000


def _set_region(i, key, v):
    def fn(obj):
        obj["regions"][i][key] = v
    return fn


@pytest.mark.parametrize("lineno,fn,msg", [
    (5, lambda o: o["end"].update(reason="finished"), "unknown end reason 'finished'"),
    (5, lambda o: o["end"].update(dropped_reports=-1), "dropped_reports must be"),
    (5, lambda o: o["end"].update(outside_reports=-3), "outside_reports must be"),
    (2, _set_region(0, "nr_accesses", 21), "nr_accesses 21 is above the 20"),
    (4, _set_region(0, "nr_accesses", 4), "nr_accesses 4 is above the 3"),
    (2, lambda o: o["regions"][0]["probes"].update(w=99), "probe 'w' hits 99"),
    (3, lambda o: o.update(time_ns=1100 * MS), "snapshot times go backwards"),
    (3, lambda o: o.update(time_ns=1000 * MS), "snapshot times go backwards"),
    (2, lambda o: o.update(pid=6), "pid 6 is not a target in the header"),
    (2, lambda o: o.update(time_ns=1 << 64), "signed 64-bit"),
    (2, lambda o: o.update(time_ns=50 * MS), "before boot"),
])
def test_invalid_record_content_is_bad_input(tmp_path, lineno, fn, msg):
    from udamon.errors import InputError
    from udamon.record.reader import read_record

    path = tmp_path / "r.jsonl"
    write_record(path, clock="monotonic")
    edit(path, lineno, fn)
    with pytest.raises(InputError) as e:
        read_record(str(path))
    assert f"r.jsonl:{lineno}:" in str(e.value) and msg in str(e.value), str(e.value)


def test_replay_records_may_have_negative_times(tmp_path):
    """The input's clock is anything the CSV holds: only the monotonic clock has a floor."""
    from udamon.record.reader import read_record

    src = csv(tmp_path, "-5000000000,1,1,0,4096,8,1\n-4900000000,1,1,0,8192,8,0\n")
    out = tmp_path / "neg.jsonl"
    run_udamon("record", "--input", str(src), "-q", "-o", str(out), check=True)
    assert read_record(str(out)).snapshots[0].time_ns < 0


# -- replay warnings, unreadable input, interval tuning ----------------------------------

@pytest.mark.parametrize("args", [["--filter", "nodes:1"], ["--probe", "n=nodes:0"],
                                  ["--breakdown", "node"]])
def test_nodes_on_replay_without_a_node_column_warn(tmp_path, args):
    src = csv(tmp_path, OK_ROWS)
    p = run_udamon("record", "--input", str(src), "-q", "-o", str(tmp_path / "x.jsonl"),
                   *args, check=True)
    (line,) = [ln for ln in p.stderr.splitlines() if "warning" in ln]
    assert "no 'node' column" in line and "this machine's CPU-to-node map" in line


def test_nodes_from_a_node_column_do_not_warn(tmp_path):
    src = tmp_path / "n.csv"
    src.write_text("time_ns,pid,tid,cpu,addr,size,write,node\n1000,1,1,0,4096,8,1,1\n")
    p = run_udamon("record", "--input", str(src), "-q", "-o", str(tmp_path / "x.jsonl"),
                   "--filter", "nodes:1", check=True)
    assert "warning" not in p.stderr


def test_cpu_nodes_maps_another_machines_cpus(tmp_path):
    """--cpu-nodes: the recorded machine's map decides, whatever this machine has; no
    warning then.  CPU 3 is on node 1 there, CPU 0 on node 0."""
    src = csv(tmp_path, "1000,1,1,0,4096,8,0\n2000,1,1,3,8192,8,0\n"
                        "12000000,1,1,3,8192,8,0\n200000000,1,1,0,12288,8,0\n")
    out = tmp_path / "x.jsonl"
    p = run_udamon("record", "--input", str(src), "-q", "-o", str(out), "--breakdown",
                   "node", "--cpu-nodes", "0-1=0,2+3=1", check=True)
    assert "warning" not in p.stderr
    from udamon import read_record

    snap = read_record(str(out)).snapshots[0]
    by_node = {k: int(snap.probe_hits[k].sum()) for k in ("node:0", "node:1")}
    assert by_node == {"node:0": 1, "node:1": 2}


@pytest.mark.parametrize("args,msg", [
    (["--cpu-nodes", "0-3"], "--cpu-nodes 0-3: bad CPU-to-node item '0-3' (expected CPUS=NODE"),
    (["--cpu-nodes", "0=0,0=1"], "--cpu-nodes 0=0,0=1: CPU 0 is mapped to nodes 0 and 1"),
])
def test_bad_cpu_nodes(tmp_path, args, msg):
    src = csv(tmp_path, OK_ROWS)
    p = run_udamon("record", "--input", str(src), "-o", str(tmp_path / "x.jsonl"), *args)
    (line,) = p.stderr.strip().splitlines()
    assert p.returncode == 2 and line.startswith(f"udamon: error: {msg}")
    assert not (tmp_path / "x.jsonl").exists()


def test_cpu_nodes_is_for_replay_only(tmp_path):
    p = run_udamon("record", "--pid", "1", "--cpu-nodes", "0=0", "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and "--cpu-nodes maps a replayed input's CPUs" in p.stderr


def test_reports_outside_the_range_are_counted_in_a_warning(tmp_path):
    src = csv(tmp_path, OK_ROWS)
    p = run_udamon("record", "--input", str(src), "-q", "-o", str(tmp_path / "x.jsonl"),
                   "--range", "0x1000-0x2000", check=True)
    assert "warning: 1 of 2 reports (50.0%) fell outside the --range ranges" in p.stderr
    assert end_line(tmp_path / "x.jsonl")["outside_reports"] == 1


def test_bad_utf8_names_its_line(tmp_path):
    src = tmp_path / "b.csv"
    src.write_bytes(HEADER.encode() + b"1000,1,1,0,4096,8,1\xff\n")
    msg = one_line_error(run_udamon("record", "--input", str(src), "-o",
                                    str(tmp_path / "x.jsonl")))
    assert f"{src}:2: not UTF-8 text" in msg


@pytest.mark.parametrize("cmd", [["record", "--input", "{f}", "-o", "{d}/x.jsonl"],
                                 ["report", "access", "-i", "{f}"]])
def test_a_garbage_gz_file_is_not_a_gzip_file(tmp_path, cmd):
    f = tmp_path / "garbage.gz"
    f.write_bytes(bytes(range(0x80, 0xC0)) * 3)
    msg = one_line_error(run_udamon(*[c.format(f=f, d=tmp_path) for c in cmd]))
    assert msg.startswith(f"udamon: error: {f}: not a gzip file"), msg


@pytest.mark.parametrize("cmd", [["record", "--input", "{f}", "-o", "{d}/x.jsonl"],
                                 ["report", "access", "-i", "{f}"]])
def test_a_bad_gzip_header_is_not_a_valid_gzip_file(tmp_path, cmd):
    f = tmp_path / "bad.gz"
    f.write_bytes(b"\x1f\x8b\x63" + b"\x00" * 40)
    msg = one_line_error(run_udamon(*[c.format(f=f, d=tmp_path) for c in cmd]))
    assert "not a valid gzip file" in msg


def test_intervals_goal_zero_aggrs_turns_tuning_off(tmp_path):
    src = csv(tmp_path, OK_ROWS)
    out = tmp_path / "x.jsonl"
    run_udamon("record", "--input", str(src), "-q", "-o", str(out),
               "--intervals-goal", "400,0,5ms,10s", check=True)
    goal = json.loads(out.read_text().splitlines()[0])["attrs"]["intervals_goal"]
    assert goal["aggrs"] == 0
    assert "AGGRS 0 turns it off" in " ".join(run_udamon("record", "--help").stdout.split())
    p = run_udamon("record", "--input", str(src), "-o", str(out),
                   "--intervals-goal", "400,-1,5ms,10s")
    assert "must be >= 0" in one_line_error(p)


def test_library_errors_name_parameters_and_the_cli_its_options(tmp_path):
    """The library says 'pid 99' and 'probe ...'; only the CLI speaks of --pid, --probe."""
    from udamon.errors import ParameterError
    from udamon.record.reader import read_record
    from udamon.report.common import check_probe, pick_pids

    path = tmp_path / "r.jsonl"
    write_record(path)
    rec = read_record(str(path))
    for call, param in ((lambda: pick_pids(rec, 99), "pid"),
                        (lambda: check_probe(rec, "nope"), "probe")):
        with pytest.raises(ParameterError) as e:
            call()
        assert e.value.param == param and "--" not in str(e.value)
        assert str(e.value).startswith(param + " ")
        assert e.value.for_option().startswith(f"--{param} ")
    p = run_udamon("report", "heatmap", "-i", str(path), "--probe", "nope")
    assert "--probe 'nope' is not a probe" in one_line_error(p)
    p = run_udamon("report", "access", "-i", str(path), "--pid", "99")
    assert "--pid 99 is not a target" in one_line_error(p)
