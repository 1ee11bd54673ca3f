"""The wp primitive through the CLI: controlled write sampling of a real pinned
workload, attributed to the writer's CPU and thread; the target stays intact."""

from __future__ import annotations

import signal

import pytest
from conftest import buffer_hits, buffers_span, run_udamon, share, start_workload

from udamon.primitives.registry import entry
from udamon.record.reader import read_record

_ok, _why = entry("wp").available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"wp primitive unavailable: {_why}")


def test_write_only_sampling_finds_written_buffers(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "16")
    try:
        rec_path = tmp_path / "wp.jsonl"
        p = run_udamon("record", "--primitive", "wp", "--pid", str(info["pid"]),
                       "--range", buffers_span(info), "--regions", "32,400", "--write-only",
                       "--breakdown", "cpu,thread", "--duration", "3s", "-q",
                       "-o", str(rec_path), timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"
    rec = read_record(str(rec_path))
    assert rec.complete and rec.coverage == "controlled"
    h = {k: buffer_hits(rec, *info[k]) for k in "RWSI"}
    print(h)
    assert h["W"]["nr_accesses"] >= 20 and h["S"]["nr_accesses"] >= 20
    assert h["R"]["nr_accesses"] == 0 and h["I"]["nr_accesses"] == 0
    writer = f"thread:{info['writer_tid']}"
    assert share(h["W"], "cpu:1", "cpu:0") >= 0.95
    assert share(h["W"], writer, f"thread:{info['reader_tid']}") >= 0.95


def test_launched_command_that_execs_and_churns_exits_cleanly(tmp_path):
    """udamon is the target's parent and its tracer here: the command maps, remaps,
    forks and execs itself under wp, and must finish with its data intact."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workloads.build import build

    torture = build("wp_torture")
    rec_path = tmp_path / "wp.jsonl"
    p = run_udamon("record", "--primitive", "wp", "--sample", "10ms", "--aggr", "200ms",
                   "-o", str(rec_path), "--", torture, "churn", "3", "--exec", timeout=120)
    assert p.returncode == 0, p.stderr
    assert "wp_torture exited with status 0" in p.stderr, p.stderr
    rec = read_record(str(rec_path))
    assert rec.complete and rec.end["reason"] == "targets-exited"
    assert any("exec'd; attached again" in n for n in rec.end.get("notes", [])), rec.end
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert any(d.get("event") == "exec" for d in lines)
    ends = [d for d in lines if d.get("event") == "end"]
    assert ends and all(d["intact"] for d in ends), ends
