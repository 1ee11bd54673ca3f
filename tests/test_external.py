"""The external primitive: reports pushed by other processes into a live session.

Real producers in their own processes (the C client demo built with gcc, the
Python client, a raw CSV writer) feed a real ``udamon record`` session through its
unix socket or stdin; the record must attribute their reports to the right
regions, CPUs, threads and sources, count every drop exactly, refuse other users,
and survive bad producers.  Ground truth: the producers report their own pinned
accesses (sched_getcpu, gettid) or synthetic ones whose fields the test chose.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, buffer_hits, run_udamon, share

from udamon.intake import wire
from udamon.intake.reports import SOURCE_IDS, make
from udamon.record.reader import read_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads.build import BuildError, build  # noqa: E402

ROOT = Path(ROOT)
CLIENTS = ROOT / "src" / "udamon" / "clients"
PY = sys.executable


@pytest.fixture(scope="module")
def demo_bin():
    try:
        return build("udamon_report_demo", CLIENTS / "udamon_report_demo.c")
    except BuildError as e:
        pytest.skip(f"cannot build the C client demo: {e}")


def _two_cpus():
    return {0, 1} <= os.sched_getaffinity(0)


def _session(sock: Path, out: Path, *args: str, pid: int | None = None) -> subprocess.Popen:
    cmd = [PY, "-m", "udamon", "record", "--primitive", "external", "--socket", str(sock),
           "-q", "-o", str(out), *args]
    if pid is not None:
        cmd += ["--pid", str(pid)]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)


def _wait_socket(sock: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"session ended early: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the session never created its socket"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


def _ranges(info: dict, *names: str) -> list[str]:
    out = []
    for n in sorted(names, key=lambda k: info[k][0]):
        out += ["--range", f"{info[n][0]:#x}-{info[n][1]:#x}"]
    return out


def _producers(rec) -> dict[str, dict]:
    return {p["name"].split("[")[0]: p for p in rec.end["producers"]}


# ------------------------------------------------------------------ wire format (no I/O)


def test_wire_round_trip_and_refusals():
    reps = make(time_ns=[5, 6, 7], pid=42, tid=[43, 44, -1], cpu=[0, 1, -1], addr=[4096, 8192,
                0x7F0000000000], size=[8, 4096, 1], write=[False, True, False], mem=[0, 2, 3],
                source="pmu")
    d = wire.decode(wire.encode(reps))
    assert d.bad == 0 and d.drops_total is None and d.out_of_step is None
    for k in ("time_ns", "pid", "tid", "cpu", "addr", "size", "write", "mem", "source"):
        assert d.reports[k].tolist() == reps[k].tolist(), k
    # a zeroed source field means "external"; a drop notice is not a report
    w = np.frombuffer(bytearray(wire.encode(reps[:1]) + wire.encode_drops(17)),
                      dtype=wire.WIRE_DTYPE).copy()
    w["source"][0] = 0
    d = wire.decode(w.tobytes())
    assert d.reports.size == 1 and d.reports["source"][0] == SOURCE_IDS["external"]
    assert d.drops_total == 17
    # fields out of range are refused and counted; the rest go through
    w = np.frombuffer(wire.encode(make(time_ns=[1] * 4, pid=1, addr=4096)),
                      dtype=wire.WIRE_DTYPE).copy()
    w["write"][0] = 2
    w["size"][1] = 0
    w["source"][2] = 200
    d = wire.decode(w.tobytes())
    assert d.reports.size == 1 and d.bad == 3 and "write is 2" in d.why_bad
    # another version mid-stream: decoding stops there
    w["write"][0], w["size"][1], w["source"][2] = 0, 1, 8
    w["version"][2] = 9
    d = wire.decode(w.tobytes())
    assert d.out_of_step == 2 and d.reports.size == 2
    # hello and reply
    v, rs, name = wire.parse_hello(wire.encode_hello("qemu-vmm"))
    assert (v, rs, name) == (1, 48, "qemu-vmm")
    with pytest.raises(wire.WireError):
        wire.parse_hello(b"x" * 64)
    assert wire.parse_reply(wire.encode_reply(True)) == (True, "")
    assert wire.parse_reply(wire.encode_reply(False, wire.REFUSE_PERMISSION))[1] == \
        "not the session's user nor root"


def test_c_header_layout_matches_wire_dtype(tmp_path):
    """The C struct and WIRE_DTYPE are the same bytes: a C program encodes one record
    with every field set and the Python decoder reads it back."""
    src = tmp_path / "one.c"
    src.write_text(textwrap.dedent(f"""\
        #include "{CLIENTS / 'udamon_report.h'}"
        #include <stdio.h>
        int main(void) {{
            struct udamon_report_rec r;
            memset(&r, 0, sizeof(r));
            r.version = 1; r.write = 1; r.source = 6; r.mem = 3;
            r.time_ns = 123456789012345; r.addr = 0x7f00000012c0ull; r.size = 64;
            r.pid = 4242; r.tid = 4243; r.cpu = 1; r.node = 0;
            fwrite(&r, sizeof(r), 1, stdout);
            return 0;
        }}
    """))
    try:
        exe = build("one", src)
    except BuildError as e:
        pytest.skip(str(e))
    raw = subprocess.run([exe], capture_output=True, check=True).stdout
    d = wire.decode(raw)
    r = d.reports[0]
    assert (int(r["time_ns"]), int(r["addr"]), int(r["size"]), int(r["pid"]), int(r["tid"]),
            int(r["cpu"]), int(r["node"]), bool(r["write"]), int(r["source"]),
            int(r["mem"])) == (123456789012345, 0x7F00000012C0, 64, 4242, 4243, 1, 0, True,
                               SOURCE_IDS["pmu"], 3)


# ------------------------------------------------------------------ live sessions


@pytest.mark.skipif(not _two_cpus(), reason="needs CPUs 0 and 1")
def test_c_client_feeds_a_live_session(tmp_path, demo_bin):
    """Two pinned threads report their own accesses through udamon_report.h: R read on
    CPU 0 by the reader, W written on CPU 1 by the writer, I never touched."""
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    demo = subprocess.Popen([demo_bin, "--socket", str(sock), "--duration", "2",
                             "--pause-us", "20000"], stdout=subprocess.PIPE, text=True)
    info = json.loads(demo.stdout.readline())
    sess = _session(sock, out, "--breakdown", "cpu,thread,rw", "--probe", "ext=source:external",
                    *_ranges(info, "R", "W", "I"), "--duration", "60s", pid=demo.pid)
    end = json.loads(demo.stdout.readline())
    assert demo.wait(10) == 0 and end["intact"]
    # the session ends when its target (the producer) exits, after reading what it sent
    _finish(sess)
    rec = read_record(str(out))
    assert rec.header["primitive"] == "external" and rec.coverage == "unknown"
    assert rec.end["reason"] == "targets-exited"
    prod = _producers(rec)
    assert set(prod) == {"demo-reader", "demo-writer"}
    assert all(p["framing"] == "binary" and p["uid"] == os.geteuid() for p in prod.values())
    # every report the producers sent is in the record, and every drop is counted
    got = sum(p["reports"] for p in prod.values())
    assert got == end["sent"] and rec.end["reports"] == end["sent"]
    assert rec.end["lost_samples"] == end["dropped"] == sum(p["dropped"] for p in prod.values())
    assert all(p["unread"] == 0 for p in prod.values())
    # attribution: regions, CPUs, threads, read/write, source
    reader, writer = f"thread:{info['reader_tid']}", f"thread:{info['writer_tid']}"
    h = {k: buffer_hits(rec, *info[k]) for k in "RWI"}
    assert h["R"]["cpu:0"] >= 10 and h["W"]["cpu:1"] >= 10
    assert share(h["R"], "cpu:0", "cpu:1") == 1.0 and share(h["W"], "cpu:1", "cpu:0") == 1.0
    assert share(h["R"], reader, writer) == 1.0 and share(h["W"], writer, reader) == 1.0
    assert share(h["R"], "read", "write") == 1.0 and share(h["W"], "write", "read") == 1.0
    assert h["R"]["ext"] == h["R"]["nr_accesses"] and h["W"]["ext"] == h["W"]["nr_accesses"]
    assert h["I"]["nr_accesses"] == 0
    assert sum(s.nr_reports for s in rec.snapshots) == end["sent"]


PY_PRODUCER = textwrap.dedent("""\
    import json, sys
    import numpy as np
    import udamon
    from udamon.reporter import Reporter
    sock, pid, lo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
    with Reporter(sock, name="py-vmm", block=True) as r:
        # one at a time: the first MiB read by CPU 0, thread 7
        for i in range(256):
            r.report(lo + i * 4096, pid=pid, tid=7, cpu=0)
        # a numpy batch: the second MiB written by CPU 1, thread 8, seen by a PMU
        b = udamon.make_reports(time_ns=0, pid=pid, tid=8, cpu=1, write=True,
                                addr=lo + (1 << 20) + np.arange(256) * 4096, source="pmu",
                                mem=3)
        r.report_batch(b)
    print(json.dumps({"sent": r.sent, "dropped": r.dropped}), flush=True)
""")


def test_python_client_reports_for_another_process(tmp_path):
    """A VMM-like producer reports accesses of another process (the target): one at a
    time and as a numpy batch (time 0 = stamped on arrival), with a source of its own."""
    target = subprocess.Popen([PY, "-c", "import mmap,time; m=mmap.mmap(-1, 4<<20); "
                               "m[0]=1; print(id(m), flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        target.stdout.readline()
        lo = 0x10000000  # a range the test chooses: reports there need no real mapping
        sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
        sess = _session(sock, out, "--range", f"{lo:#x}-{lo + (2 << 20):#x}", "--probe",
                        "pmu=source:pmu", "--probe", "rr=mem:remote-ram", "--breakdown",
                        "cpu,rw", "--duration", "3s", pid=target.pid)
        _wait_socket(sock, sess)
        p = subprocess.run([PY, "-c", PY_PRODUCER, str(sock), str(target.pid), hex(lo)],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        _finish(sess)
    finally:
        target.kill()
        target.wait()
    assert res == {"sent": 512, "dropped": 0}
    rec = read_record(str(out))
    prod = _producers(rec)
    assert prod["py-vmm"]["reports"] == 512 and rec.end["reports"] == 512
    assert rec.end["late_reports"] == 0
    a = buffer_hits(rec, lo, lo + (1 << 20))
    b = buffer_hits(rec, lo + (1 << 20), lo + (2 << 20))
    assert a["cpu:0"] > 0 and a["cpu:1"] == 0 and a["write"] == 0 and a["pmu"] == 0
    assert b["cpu:1"] > 0 and b["cpu:0"] == 0 and b["read"] == 0
    assert b["pmu"] == b["nr_accesses"] == b["rr"] > 0


def test_flood_drops_are_counted_exactly_and_intervals_kept(tmp_path, demo_bin):
    """A producer that never blocks floods a session that is stopped (SIGSTOP) for a
    while: it drops what the socket cannot hold, counts it, tells the session, and the
    record's counts add up exactly to what was sent."""
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    count = 3_000_000
    demo = subprocess.Popen([demo_bin, "--socket", str(sock), "--mode", "flood", "--count",
                             str(count)], stdout=subprocess.PIPE, text=True)
    sess = _session(sock, out, "--aggr", "100ms", "--duration", "60s", pid=demo.pid)
    json.loads(demo.stdout.readline())  # connected: the flood starts now
    os.kill(sess.pid, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(sess.pid, signal.SIGCONT)
    end = json.loads(demo.stdout.readline())
    assert demo.wait(30) == 0
    _finish(sess)
    rec = read_record(str(out))
    assert end["sent"] + end["dropped"] == count
    assert end["dropped"] > 0, "the flood was never faster than the session"
    (p,) = rec.end["producers"]
    assert p["reports"] == end["sent"] and p["dropped"] == end["dropped"]
    assert rec.end["lost_samples"] == end["dropped"] and rec.end["reports"] == end["sent"]
    assert rec.end["dropped_reports"] == 0 and p["unread"] == 0
    # the session kept its aggregation intervals: one snapshot per interval, no gaps
    t = np.array([s.time_ns for s in rec.snapshots])
    aggr = rec.attrs.aggr_us * 1000
    assert np.all(np.diff(t)[:-1] == aggr)
    assert sum(s.nr_reports for s in rec.snapshots) == end["sent"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a child switches to uid 65534)")
def test_only_the_sessions_user_or_root_may_report(tmp_path, demo_bin):
    """The socket is created 0600; a process of another uid cannot connect, and when
    the socket's mode is opened up anyway, the peer-credential check still refuses it.
    The other user's producer is the C client (anything under /root is out of its reach)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="udamon-perm-", dir="/tmp"))
    d.chmod(0o755)  # reachable for uid 65534 (pytest's tmp_path is not)
    sock, out = d / "s.sock", tmp_path / "rec.jsonl"
    try:
        sess = _session(sock, out, "--range", "0x10000000-0x10100000", "--duration", "4s",
                        pid=os.getpid())
        _wait_socket(sock, sess)
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()

        def as_nobody():
            return subprocess.run([demo_bin, "--socket", str(sock), "--duration", "0.2"],
                                  capture_output=True, text=True, timeout=30,
                                  preexec_fn=lambda: os.setuid(65534))

        p = as_nobody()  # the file's mode refuses the connect itself
        assert p.returncode == 1 and "Permission denied" in p.stderr, p.stderr
        os.chmod(sock, 0o666)  # a careless chmod: the peer credentials still decide
        p = as_nobody()
        assert p.returncode == 1 and "Permission denied" in p.stderr, p.stderr
        # the session's own user may report (the Python client, as root)
        code = "import sys\nfrom udamon.reporter import Reporter\nReporter(sys.argv[1]).close()"
        p = subprocess.run([PY, "-c", code, str(sock)], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
        err = _finish(sess)
    finally:
        subprocess.run(["rm", "-rf", str(d)])
    rec = read_record(str(out))
    # refused twice by the peer check: the reader and the writer thread of the demo
    assert {r["uid"] for r in rec.end["refused_producers"]} == {65534}
    assert "refused a connection" in err and "uid 65534" in err
    assert [p["reports"] for p in rec.end["producers"]] == [0]


def _csv_producer(sock: Path, lines: list[str]) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.sendall("".join(line + "\n" for line in lines).encode())
    s.close()


def test_csv_framing_and_a_bad_producer(tmp_path):
    """CSV lines over the socket (what socat or a script sends); a producer that sends
    a bad line is disconnected with the line named, the session and the other
    producers go on."""
    lo = 0x10000000
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    sess = _session(sock, out, "--range", f"{lo:#x}-{lo + (1 << 20):#x}", "--duration", "3s",
                    pid=os.getpid())
    _wait_socket(sock, sess)
    me = os.getpid()
    hdr = "time_ns,pid,tid,cpu,addr,size,write"
    good = [hdr] + [f"0,{me},{me},1,{lo + i * 4096},4096,1" for i in range(100)]
    bad = [hdr] + [f"0,{me},{me},0,{lo},4096,0"] * 5 + [f"0,{me},{me},zero,{lo},4096,0"] + \
        [f"0,{me},{me},0,{lo},4096,0"] * 5
    time.sleep(0.2)
    _csv_producer(sock, bad)
    _csv_producer(sock, good)
    err = _finish(sess)
    rec = read_record(str(out))
    prods = rec.end["producers"]
    assert [p["framing"] for p in prods] == ["csv", "csv"]
    # the five lines before the bad one count; the bad one and the rest do not
    assert prods[0]["reports"] == 5 and ":7: field 'cpu'" in prods[0]["error"]
    assert prods[1]["reports"] == 100 and "error" not in prods[1]
    assert rec.end["reports"] == 105 and "disconnected" in err


def test_stdin_csv_live_and_bad_line_is_exit_2(tmp_path):
    """`... | udamon record --input -`: a live session fed from stdin, ending at the end
    of the input; time 0 means 'now'; bpftrace's 'Lost N events' line between the
    rows is N reports the producer lost; a bad line is bad input (exit 2, stdin:LINE)."""
    lo = 0x10000000
    me = os.getpid()
    out = tmp_path / "rec.jsonl"
    lines = ["time_ns,pid,tid,cpu,addr,size,write,source"] + \
        [f"0,{me},{me},{i % 2},{lo + i * 4096},4096,{i % 2},external" for i in range(64)]
    lines.insert(40, "Lost 17 events")
    p = run_udamon("record", "--input", "-", "--pid", str(me), "--range",
                   f"{lo:#x}-{lo + (1 << 20):#x}", "--breakdown", "cpu,rw", "-o", str(out),
                   input="\n".join(lines) + "\n", timeout=60)
    assert p.returncode == 0, p.stderr
    rec = read_record(str(out))
    assert rec.header["primitive"] == "external"
    assert rec.end["reason"] == "input-exhausted" and rec.end["reports"] == 64
    assert rec.end["lost_samples"] == 17 and rec.end["producers"][0]["dropped"] == 17
    h = buffer_hits(rec, lo, lo + (1 << 20))
    assert h["cpu:0"] > 0 and h["cpu:1"] > 0 and h["write"] > 0 and h["read"] > 0
    lines[3] = f"0,{me},{me},x,{lo},4096,0,external"
    p = run_udamon("record", "--input", "-", "--pid", str(me), "--range",
                   f"{lo:#x}-{lo + (1 << 20):#x}", "-o", str(out),
                   input="\n".join(lines) + "\n", timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("udamon: error: stdin:4: field 'cpu'")
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not _two_cpus(), reason="needs CPUs 0 and 1")
def test_sigkill_of_the_session_spares_the_producer(tmp_path, demo_bin):
    """A producer whose session is SIGKILLed keeps running (no SIGPIPE, its data
    intact) and counts everything after as dropped; the stale socket left behind is
    replaced by the next session."""
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    demo = subprocess.Popen([demo_bin, "--socket", str(sock), "--duration", "2.5"],
                            stdout=subprocess.PIPE, text=True)
    sess = _session(sock, out, "--duration", "60s", pid=demo.pid)
    json.loads(demo.stdout.readline())
    _wait_socket(sock, sess)  # killed before it listens, it would spare nothing
    time.sleep(0.5)
    sess.kill()
    sess.wait()
    end = json.loads(demo.stdout.readline())
    assert demo.wait(10) == 0 and end["intact"] and end["dropped"] > 0
    assert sock.exists()  # SIGKILL leaves the socket file: a later session replaces it
    sess = _session(sock, out, "--range", "0x10000000-0x10100000", "--duration", "1s",
                    pid=os.getpid())
    _finish(sess)
    assert not sock.exists()  # removed at the end


@pytest.mark.parametrize("args,msg", [
    (["--primitive", "external", "--pid", "1"], "needs --socket PATH"),
    (["--socket", "/nonexistent-dir/s.sock", "--pid", "1"], "does not exist"),
    (["--primitive", "replay", "--input", "-"], "is for --primitive external"),
    (["--socket", "x" * 120, "--pid", "1"], "too long for a unix socket"),
    (["--primitive", "external", "--input", "-", "--input-format", "perf-script",
      "--pid", "1"], "is for replaying a file"),
])
def test_bad_external_options_are_exit_2(tmp_path, args, msg):
    p = run_udamon("record", *args, "-o", str(tmp_path / "r.jsonl"))
    assert p.returncode == 2, p.stderr
    assert msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_socket_path_that_is_a_file_or_a_live_session(tmp_path):
    f = tmp_path / "plain"
    f.write_text("x")
    p = run_udamon("record", "--socket", str(f), "--pid", str(os.getpid()), "-o",
                   str(tmp_path / "r.jsonl"))
    assert p.returncode == 2 and "is not a socket" in p.stderr
    assert f.read_text() == "x"
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    sess = _session(sock, out, "--range", "0x10000000-0x10100000", "--duration", "3s",
                    pid=os.getpid())
    _wait_socket(sock, sess)
    p = run_udamon("record", "--socket", str(sock), "--pid", str(os.getpid()), "-o",
                   str(tmp_path / "r2.jsonl"))
    assert p.returncode == 2 and "another session is listening" in p.stderr
    _finish(sess)


def test_reporter_command_forwards_stdin_to_a_session(tmp_path):
    """`producer | python -m udamon.reporter --socket PATH`: the pipeline form for
    sessions that do not read stdin (monitor, exporter, migrate, or a record with a
    socket)."""
    lo, me = 0x10000000, os.getpid()
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    sess = _session(sock, out, "--range", f"{lo:#x}-{lo + (1 << 20):#x}", "--duration", "3s",
                    pid=me)
    lines = ["time_ns,pid,tid,cpu,addr,size,write"] + \
        [f"0,{me},{me},1,{lo + i * 4096},4096,1" for i in range(200)]
    p = subprocess.run([PY, "-m", "udamon.reporter", "--socket", str(sock)],
                       input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    _finish(sess)
    rec = read_record(str(out))
    (prod,) = rec.end["producers"]
    assert prod["framing"] == "csv" and prod["reports"] == 200 and rec.end["reports"] == 200
    p = subprocess.run([PY, "-m", "udamon.reporter", "--socket", str(sock),
                        "--connect-timeout", "0.2"], input="", capture_output=True, text=True)
    assert p.returncode == 1 and "cannot connect" in p.stderr
    assert Path(subprocess.run([PY, "-m", "udamon.reporter", "--c-header"], capture_output=True,
                               text=True).stdout.strip()).is_file()


def test_many_producers_are_summed_in_the_record():
    from udamon.intake.channel import Producer
    from udamon.primitives.external import MAX_LISTED, _listed

    ps = [Producer(i, f"p{i}", reports=2, dropped=1) for i in range(MAX_LISTED + 5)]
    ps[-1].error = "gone"
    out = _listed(ps)
    assert len(out) == MAX_LISTED + 1 and out[0]["name"] == "p0"
    assert (out[-1]["reports"], out[-1]["dropped"]) == (10, 5) and "1 of them" in out[-1]["error"]


def test_binary_stream_out_of_step_disconnects_that_producer(tmp_path):
    """A raw binary producer whose stream slips (a record with another version) is cut
    off at the slip; what it sent before counts; its refused fields are counted."""
    lo, me = 0x10000000, os.getpid()
    sock, out = tmp_path / "s.sock", tmp_path / "rec.jsonl"
    sess = _session(sock, out, "--range", f"{lo:#x}-{lo + (1 << 20):#x}", "--duration", "2s",
                    pid=me)
    _wait_socket(sock, sess)
    good = make(time_ns=0, pid=me, addr=lo + np.arange(6) * 4096, cpu=0)
    w = np.frombuffer(wire.encode(good), dtype=wire.WIRE_DTYPE).copy()
    w["write"][1] = 7  # refused: write must be 0 or 1
    w["version"][4] = 2  # the slip
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.sendall(wire.encode_hello("slipping"))
    ok, _ = wire.parse_reply(s.recv(16))
    assert ok
    s.sendall(w.tobytes())
    time.sleep(0.3)
    s.close()
    _finish(sess)
    rec = read_record(str(out))
    (p,) = rec.end["producers"]
    assert p["name"].startswith("slipping[") and p["reports"] == 3 and p["bad"] == 1
    assert "out of step" in p["error"]
