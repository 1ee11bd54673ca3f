"""A real third-party producer: the bpftrace one-liner of docs/report-channel.md feeding
a live `udamon record --input -` session through the text framing.

With kernel.numa_balancing on, bpftrace sees the pinned workload's hinting faults
on `tracepoint:exceptions:page_fault_user`; the record must attribute the reader's
buffer to CPU 0, the reader thread and reads, the writer's to CPU 1, the writer
and writes.  Needs root and bpftrace (CI installs Debian's; it runs as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import buffer_hits, buffers_span, share, start_workload

from udamon.record.reader import read_record

DOC = Path(__file__).resolve().parent.parent / "docs" / "report-channel.md"
NUMA = "/proc/sys/kernel/numa_balancing"


def documented_one_liner() -> str:
    """The bpftrace program exactly as the docs give it (between -e '...')."""
    text = DOC.read_text()
    m = re.search(r"```sh\nbpftrace -q -e '(.*?)' PID \\\n", text, re.S)
    assert m, "docs/report-channel.md lost its bpftrace one-liner"
    return m.group(1)


def _bpftrace_runs() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (bpftrace loads BPF programs)"
    if shutil.which("bpftrace") is None:
        return False, "bpftrace is not installed (Debian: apt-get install bpftrace)"
    p = subprocess.run(["bpftrace", "-q", "-e", "BEGIN { exit(); }"], capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        return False, f"bpftrace cannot run here: {p.stderr.strip().splitlines()[-1:]}"
    return True, ""


_ok, _why = _bpftrace_runs()
pytestmark = [pytest.mark.skipif(not _ok, reason=_why),
              pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0),
                                 reason="needs CPUs 0 and 1")]


def test_bpftrace_page_faults_feed_a_live_session(tmp_path, access_pattern_bin):
    from udamon.system.sysctl_guard import SettingsGuard, apply_numa_balancing, apply_tracefs

    prog = documented_one_liner() + " interval:s:7 { exit(); }"
    numa_before = Path(NUMA).read_text().strip()
    wl, info = start_workload(access_pattern_bin, "--duration", "40", "--size", "16")
    guard = SettingsGuard(handle_signals=False)
    try:
        apply_tracefs(guard)
        apply_numa_balancing(guard, 5000)  # hinting faults: what bpftrace will see
        out = tmp_path / "bt.jsonl"
        bt = subprocess.Popen(["bpftrace", "-q", "-e", prog, str(info["pid"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rec = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--input", "-",
                                "--pid", str(info["pid"]), "--range", buffers_span(info),
                                "--regions", "64,1000", "--breakdown", "cpu,thread,rw",
                                "-q", "-o", str(out)], stdin=bt.stdout, stderr=subprocess.PIPE,
                               text=True)
        bt.stdout.close()  # the session holds the pipe's read end now
        _, err = rec.communicate(timeout=120)
        bt.wait(30)
        assert rec.returncode == 0, err
        assert bt.returncode == 0, bt.stderr.read().decode()
    finally:
        guard.restore()
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"
    deadline = time.time() + 5
    while Path(NUMA).read_text().strip() != numa_before and time.time() < deadline:
        time.sleep(0.05)
    assert Path(NUMA).read_text().strip() == numa_before
    r = read_record(str(out))
    assert r.header["primitive"] == "external"
    assert r.end["reason"] == "input-exhausted"  # bpftrace exited: end of input
    (p,) = r.end["producers"]
    assert p["name"] == "stdin" and p["framing"] == "csv" and p["reports"] > 0
    assert r.end["reports"] == p["reports"]
    reader, writer = f"thread:{info['reader_tid']}", f"thread:{info['writer_tid']}"
    h = {k: buffer_hits(r, *info[k]) for k in "RWSI"}
    print({k: v for k, v in h.items()}, "late", r.end["late_reports"])
    assert h["R"]["cpu:0"] >= 5 and h["W"]["cpu:1"] >= 5, "too few hinting faults seen"
    assert share(h["R"], "cpu:0", "cpu:1") >= 0.95 and share(h["R"], reader, writer) >= 0.95
    assert share(h["R"], "read", "write") >= 0.95
    assert share(h["W"], "cpu:1", "cpu:0") >= 0.95 and share(h["W"], writer, reader) >= 0.95
    assert share(h["W"], "write", "read") >= 0.95
    assert h["I"]["cpu:0"] + h["I"]["cpu:1"] <= 0.02 * (h["R"]["cpu:0"] + h["W"]["cpu:1"])
