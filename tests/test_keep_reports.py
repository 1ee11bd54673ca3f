"""``udamon record --keep-reports``: the raw report stream beside the record, which a
later replay counts with a breakdown the live session did not have."""

from __future__ import annotations

import gzip
import signal

import pytest
from conftest import buffer_hits, buffers_span, run_udamon, share, start_workload
from hypothesis import given, settings
from hypothesis import strategies as st

from udamon.intake import csv_format
from udamon.intake.reports import MEM_LEVELS, SOURCES, empty
from udamon.primitives.registry import entry
from udamon.record.reader import read_record


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-(1 << 62), 1 << 62), st.integers(0, (1 << 31) - 1),
                          st.integers(-1, 1 << 20), st.integers(-1, 512), st.integers(-1, 8),
                          st.integers(0, (1 << 63)), st.integers(1, 1 << 21), st.booleans(),
                          st.integers(0, len(SOURCES) - 1),
                          st.integers(0, len(MEM_LEVELS) - 1), st.integers(-1, 8)),
                min_size=1, max_size=40))
def test_written_rows_read_back_to_the_same_reports(rows):
    r = empty(len(rows))
    for i, name in enumerate(csv_format.ALL_COLUMNS):
        r[name] = [row[i] for row in rows]
    text = csv_format.format_rows(r)
    lines = text.splitlines()
    back = csv_format.parse_rows("x", lines, list(range(2, len(lines) + 2)),
                                 list(csv_format.ALL_COLUMNS), len(csv_format.ALL_COLUMNS))
    assert back.tobytes() == r.tobytes()


_ok, _why = entry("wp").available()


@pytest.mark.skipif(not _ok, reason=f"wp primitive unavailable: {_why}")
def test_kept_reports_answer_a_breakdown_the_record_did_not_have(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "16")
    rec_path, kept = tmp_path / "live.jsonl", tmp_path / "reports.csv.gz"
    try:
        p = run_udamon("record", "--primitive", "wp", "--pid", str(info["pid"]),
                       "--range", buffers_span(info), "--regions", "32,400", "--write-only",
                       "--breakdown", "none", "--duration", "3s", "-q", "-o", str(rec_path),
                       "--keep-reports", str(kept), timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0, "the workload's data was damaged"
    live = read_record(str(rec_path))
    assert not any(n.startswith("thread:") for n in live.probe_names)
    with gzip.open(kept, "rt") as f:
        header, *rows = f.read().splitlines()
    assert header.split(",") == list(csv_format.ALL_COLUMNS)
    assert len(rows) == live.end["reports"] > 0  # every report the record counted
    assert any(f"kept {len(rows)} reports" in n for n in live.end["notes"])
    again = tmp_path / "again.jsonl"
    p = run_udamon("record", "--input", str(kept), "--range", buffers_span(info),
                   "--regions", "32,400", "--breakdown", "thread,cpu", "-q", "-o", str(again))
    assert p.returncode == 0, p.stderr
    rec = read_record(str(again))
    assert rec.end["reports"] == len(rows)
    w = buffer_hits(rec, *info["W"])
    # the workload's writer thread, pinned to CPU 1, writes W: the replay says so
    assert share(w, f"thread:{info['writer_tid']}", f"thread:{info['reader_tid']}") >= 0.95
    assert share(w, "cpu:1", "cpu:0") >= 0.95
    assert buffer_hits(rec, *info["R"]).get("nr_accesses", 0) == 0  # R is only read


def one_line_error(p, code: int = 2) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_keep_reports_may_not_be_the_record_or_the_input(tmp_path):
    csv = tmp_path / "in.csv"
    csv.write_text("time_ns,pid,tid,cpu,addr,size,write\n1,5,5,0,4096,4096,1\n")
    out = tmp_path / "r.jsonl"
    p = run_udamon("record", "--input", str(csv), "-o", str(out), "--keep-reports", str(out))
    assert "is also the -o file" in one_line_error(p)
    p = run_udamon("record", "--input", str(csv), "-o", str(out), "--keep-reports", str(csv))
    assert "is also the --input file" in one_line_error(p)
    assert csv.read_text().startswith("time_ns")  # nothing destroyed
