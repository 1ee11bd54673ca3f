"""The hint primitive end to end, through the CLI, on a real pinned workload.

A reader thread on CPU 0 reads R, a writer on CPU 1 writes W, both use S, and
I is touched once and then left alone.  The record must attribute R to the
reader's CPU and thread and W to the writer's, as reads and writes.
Needs root (kernel.numa_balancing, perf_event_open) and gcc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import buffer_hits, buffers_span, run_udamon, share, start_workload

from udamon.primitives.hint import hint_available
from udamon.record.reader import read_record
from udamon.system.perf_tracepoint import online_cpus

NUMA = "/proc/sys/kernel/numa_balancing"
_ok, _why = hint_available()
pytestmark = [
    pytest.mark.skipif(not _ok, reason=f"hint primitive unavailable: {_why}"),
    pytest.mark.skipif(not {0, 1} <= set(online_cpus()), reason="needs CPUs 0 and 1"),
]


@pytest.fixture(autouse=True)
def numa_restored():
    """Whatever a test does, kernel.numa_balancing ends as it started."""
    orig = Path(NUMA).read_text().strip()
    yield orig
    deadline = time.time() + 5
    while Path(NUMA).read_text().strip() != orig and time.time() < deadline:
        time.sleep(0.05)
    now = Path(NUMA).read_text().strip()
    if now != orig:
        Path(NUMA).write_text(orig)
    assert now == orig, "udamon left kernel.numa_balancing changed"


def test_reads_and_writes_attributed_to_cpu_and_thread(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "16")
    try:
        rec_path = tmp_path / "hint.jsonl"
        p = run_udamon("record", "--primitive", "hint", "--pid", str(info["pid"]),
                       "--range", buffers_span(info), "--regions", "64,1000", "--cpus", "0",
                       "--breakdown", "cpu,thread,rw", "--duration", "6s", "-q",
                       "-o", str(rec_path), timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"
    rec = read_record(str(rec_path))
    assert rec.complete and rec.end["reason"] == "duration"
    assert rec.coverage == "unknown" and rec.header["primitive"] == "hint"
    reader, writer = f"thread:{info['reader_tid']}", f"thread:{info['writer_tid']}"
    assert {"cpu:0", "cpu:1", reader, writer, "write", "read"} <= set(rec.probe_names)
    h = {k: buffer_hits(rec, *info[k]) for k in "RWSI"}
    print({k: v for k, v in h.items()})
    assert h["R"]["cpu:0"] >= 5 and h["W"]["cpu:1"] >= 5, "too few hint faults observed"
    assert share(h["R"], "cpu:0", "cpu:1") >= 0.95
    assert share(h["R"], reader, writer) >= 0.95
    assert share(h["R"], "read", "write") >= 0.95
    assert share(h["W"], "cpu:1", "cpu:0") >= 0.95
    assert share(h["W"], writer, reader) >= 0.95
    assert share(h["W"], "write", "read") >= 0.95
    assert h["S"]["cpu:0"] > 0 and h["S"]["cpu:1"] > 0  # shared: both CPUs
    assert h["I"]["cpu:0"] + h["I"]["cpu:1"] <= 0.02 * (h["R"]["cpu:0"] + h["W"]["cpu:1"])
    # the sample filter --cpus 0: only CPU 0's accesses count in nr_accesses
    assert h["R"]["nr_accesses"] >= 5
    assert h["W"]["nr_accesses"] <= 0.05 * h["W"]["cpu:1"]
    # page locations were sampled: the populated buffers live on this machine's nodes
    from udamon.targets.topology import cpu_to_node

    nodes = {n for n in cpu_to_node().tolist() if n >= 0}
    located = [n for s in rec.snapshots for n in s.region_page_nodes()]
    assert located and sum(sum(d.values()) for d in located) > 0
    assert all(set(d) <= nodes for d in located)


def test_target_exit_closes_the_record(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "3", "--size", "4")
    rec_path = tmp_path / "exit.jsonl"
    t0 = time.monotonic()
    p = run_udamon("record", "--primitive", "hint", "--pid", str(info["pid"]),
                   "--duration", "30s", "-q", "-o", str(rec_path), timeout=60)
    assert wl.wait(10) == 0
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 15
    rec = read_record(str(rec_path))
    assert rec.end["reason"] == "targets-exited"
    assert len(rec.snapshots) >= 3


def test_launch_a_command(tmp_path, access_pattern_bin):
    rec_path = tmp_path / "cmd.jsonl"
    p = run_udamon("record", "--primitive", "hint", "--duration", "2s", "-o", str(rec_path),
                   "--", access_pattern_bin, "--duration", "3", "--size", "4", timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines[0]["event"] == "start" and lines[-1] == {**lines[-1], "intact": True}
    assert "exited with status 0" in p.stderr
    rec = read_record(str(rec_path))
    assert rec.header["targets"][0]["pid"] == lines[0]["pid"]
    assert rec.header["command"][0] == access_pattern_bin
    # monitored from its start: the first-touch faults of the buffers are seen
    assert sum(s.nr_reports for s in rec.snapshots) >= 4 * (4 << 20) // 4096 * 0.9


def test_sigkill_of_udamon_restores_settings_and_spares_the_target(tmp_path, access_pattern_bin,
                                                                   numa_restored):
    from udamon.system.mounts import is_mounted

    tracefs_before = is_mounted("/sys/kernel/tracing")
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "8")
    try:
        rec_path = tmp_path / "killed.jsonl"
        u = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                              "--pid", str(info["pid"]), "--duration", "60s", "-q",
                              "-o", str(rec_path)], stderr=subprocess.PIPE)
        deadline = time.time() + 10
        while Path(NUMA).read_text().strip() == numa_restored and time.time() < deadline:
            time.sleep(0.02)
        if numa_restored != "1":
            assert Path(NUMA).read_text().strip() != numa_restored, "udamon never turned it on"
        time.sleep(1.0)
        u.kill()
        u.wait(10)
        deadline = time.time() + 5
        while Path(NUMA).read_text().strip() != numa_restored and time.time() < deadline:
            time.sleep(0.05)
        assert Path(NUMA).read_text().strip() == numa_restored
        while is_mounted("/sys/kernel/tracing") != tracefs_before and time.time() < deadline:
            time.sleep(0.05)
        assert is_mounted("/sys/kernel/tracing") == tracefs_before  # a mount udamon made is undone
        assert wl.poll() is None, "the target died with udamon"
        # the record is readable up to the kill, and says it is incomplete
        rec = read_record(str(rec_path))
        assert not rec.complete
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"


def test_sigterm_ends_the_record_cleanly(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "4")
    try:
        rec_path = tmp_path / "term.jsonl"
        u = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                              "--pid", str(info["pid"]), "-q", "-o", str(rec_path)],
                             stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        u.send_signal(signal.SIGTERM)
        assert u.wait(10) == 0, u.stderr.read()
        rec = read_record(str(rec_path))
        assert rec.complete and rec.end["reason"] == "interrupted"
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0


@pytest.mark.parametrize("argv,msg", [
    (["--pid", "999999999"], "does not exist"),
    ([], "--pid PID or -- COMMAND"),
    (["--", "/nonexistent/cmd"], "not found"),
    (["--pid", "1", "--input", "x.csv"], "--input is for the replay"),
])
def test_bad_live_usage(tmp_path, argv, msg):
    p = run_udamon("record", "--primitive", "hint", "-o", str(tmp_path / "r.jsonl"), *argv,
                   cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and msg in p.stderr, p.stderr


def test_not_root_is_a_clear_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                        "--pid", str(os.getpid()), "-o", "/tmp/udamon-nobody.jsonl"],
                       capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    assert p.returncode in (1, 2), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "root" in p.stderr, p.stderr


def test_overlapping_sessions_keep_balancing_on_until_the_last_ends(tmp_path, numa_restored):
    """Session A turns NUMA balancing on, B starts while A runs; A ending must not
    turn it off under B, and B ending restores the value from before A."""
    target = subprocess.Popen(["sleep", "60"])

    def record(name: str, duration: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                                 "--pid", str(target.pid), "--duration", duration, "-q",
                                 "-o", str(tmp_path / f"{name}.jsonl")],
                                stderr=subprocess.PIPE, text=True)

    def numa() -> str:
        return Path(NUMA).read_text().strip()

    Path(NUMA).write_text("0")  # so that A really changes it (numa_restored puts it back)
    try:
        a = record("a", "4s")
        deadline = time.time() + 15
        while numa() == "0" and time.time() < deadline:
            time.sleep(0.02)
        assert numa() == "1", "session A never turned NUMA balancing on"
        b = record("b", "60s")
        b_state = Path(f"/run/udamon/settings-{b.pid}.json")

        def b_needs_it() -> bool:
            try:
                return any(e["path"] == NUMA for e in json.loads(b_state.read_text())["entries"])
            except (OSError, ValueError):
                return False

        deadline = time.time() + 15
        while not b_needs_it() and time.time() < deadline:  # B is up and found it on
            time.sleep(0.02)
        assert b_needs_it(), "session B did not record that it needs NUMA balancing"
        assert a.wait(30) == 0, a.stderr.read()
        time.sleep(0.5)
        assert b.poll() is None, b.stderr.read()
        assert numa() == "1", "the first session out turned NUMA balancing off under the other"
        b.send_signal(signal.SIGTERM)
        assert b.wait(15) == 0, b.stderr.read()
        assert numa() == "0", "the last session out did not restore NUMA balancing"
    finally:
        target.kill()
        target.wait()
        Path(NUMA).write_text(numa_restored)


def test_availability_check_mounts_nothing(monkeypatch):
    """hint_available() runs before the settings guard exists: a mount it made (even
    one undone right after) would outlive a SIGKILL during start-up."""
    from udamon.system import mounts, perf_tracepoint

    calls = []
    for mod in (mounts, perf_tracepoint):
        monkeypatch.setattr(mod, "mount", lambda *a, **k: calls.append(a))
    before = Path("/proc/self/mounts").read_text()
    ok, why = hint_available()
    assert ok, why
    assert calls == [], "the availability check mounted something"
    assert Path("/proc/self/mounts").read_text() == before


def test_no_faults_at_all_is_said_to_be_not_observed(tmp_path):
    """A target the NUMA scanner never samples (here: one that sleeps) gives 0 reports;
    stderr and the record's end notes must say that means 'not observed', not 'cold'."""
    target = subprocess.Popen(["sleep", "30"])
    try:
        rec_path = tmp_path / "idle.jsonl"
        p = run_udamon("record", "--primitive", "hint", "--pid", str(target.pid),
                       "--duration", "2s", "-q", "-o", str(rec_path), timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        target.kill()
        target.wait()
    msg = f"no hinting faults observed for pid {target.pid} in "
    assert msg in p.stderr and "'not observed', not 'cold'" in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if msg in ln]) == 1
    rec = read_record(str(rec_path))
    assert sum(s.nr_reports for s in rec.snapshots) == 0
    assert any(msg in n for n in rec.end.get("notes", [])), rec.end


# exits as soon as the udamon whose pid the test writes into TRIGGER has created its
# settings state file, i.e. while that udamon is starting the primitive
_EXIT_DURING_START = """
import os, sys, time
trigger = sys.argv[1]
while not os.path.getsize(trigger):
    time.sleep(0.002)
state = f"/run/udamon/settings-{open(trigger).read().strip()}.json"
while not os.path.exists(state):
    time.sleep(0.002)
"""


def test_one_of_several_pids_exiting_during_start_up(tmp_path):
    trigger = tmp_path / "trigger"
    trigger.write_text("")
    quitter = subprocess.Popen([sys.executable, "-c", _EXIT_DURING_START, str(trigger)])
    stayer = subprocess.Popen(["sleep", "30"])
    rec_path = tmp_path / "two.jsonl"
    try:
        u = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                              "--pid", f"{quitter.pid},{stayer.pid}", "--duration", "2s", "-q",
                              "-o", str(rec_path)], stderr=subprocess.PIPE, text=True)
        trigger.write_text(str(u.pid))
        _, err = u.communicate(timeout=60)
        assert quitter.wait(10) == 0
    finally:
        for p in (quitter, stayer):
            p.kill()
            p.wait()
    assert u.returncode == 0, err
    note = f"process {quitter.pid} exited before monitoring started"
    assert note in err, err
    rec = read_record(str(rec_path))
    assert rec.complete and [t["pid"] for t in rec.header["targets"]] == [stayer.pid]
    assert any(note in n for n in rec.header.get("notes", [])), rec.header


def test_the_only_pid_exiting_during_start_up_is_one_line(tmp_path):
    trigger = tmp_path / "trigger"
    trigger.write_text("")
    quitter = subprocess.Popen([sys.executable, "-c", _EXIT_DURING_START, str(trigger)])
    u = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive", "hint",
                          "--pid", str(quitter.pid), "--duration", "2s", "-q",
                          "-o", str(tmp_path / "r.jsonl")], stderr=subprocess.PIPE, text=True)
    trigger.write_text(str(u.pid))
    _, err = u.communicate(timeout=60)
    quitter.wait(10)
    assert u.returncode == 1, err
    (line,) = err.strip().splitlines()
    assert line.startswith("udamon: error: process ") and str(quitter.pid) in line, err


def test_thread_breakdown_of_a_launched_command_says_what_it_covers(tmp_path):
    p = run_udamon("record", "--primitive", "hint", "--breakdown", "thread", "-q",
                   "--duration", "1s", "-o", str(tmp_path / "t.jsonl"), "--", "sleep", "2",
                   timeout=60)
    assert p.returncode == 0, p.stderr
    notes = [ln for ln in p.stderr.splitlines() if "--breakdown thread" in ln]
    assert len(notes) == 1 and "not broken down" in notes[0], p.stderr
    h = run_udamon("record", "--help")
    assert "threads created later are not broken" in " ".join(h.stdout.split())
