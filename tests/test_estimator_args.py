"""Bad input to udamon dirty-rate and udamon ksm-advise: one line on stderr, exit 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_udamon  # noqa: E402

ME = str(os.getpid())
CASES = [
    ("dirty-rate", ["--pid", "2147483647"], "does not exist"),
    ("dirty-rate", ["--pid", ME, "--bandwidth", "fast"], "bad rate"),
    ("dirty-rate", ["--pid", f"{ME},1", "--range", "0x1000-0x2000"], "say which target"),
    ("dirty-rate", ["--pid", ME, "--range", "5:0x1000-0x2000"], "not one of the --pid"),
    ("dirty-rate", ["--pid", ME, "--range", "0x3000-0x2000"], "bad --range"),
    ("dirty-rate", ["--pid", ME, "--window", "5s", "--duration", "1s"], "--window"),
    ("dirty-rate", ["--pid", ME, "--precision", "0.9"], "factor above 1"),
    ("dirty-rate", ["--pid", ME, "--confidence", "2"], "confidence"),
    ("dirty-rate", ["--pid", "abc"], "not a process id"),
    ("ksm-advise", ["--pid", "2147483647"], "does not exist"),
    ("ksm-advise", ["--pid", ME, "--dry-run"], "--dry-run goes with --apply"),
    ("ksm-advise", ["--pid", ME, "--ksm-sleep", "20ms"], "go with --ksm-run"),
    ("ksm-advise", ["--pid", ME, "--interval", "5s", "--duration", "1s"], "--interval"),
    ("ksm-advise", ["--pid", ME, "--top", "0"], "at least 1"),
]


@pytest.mark.parametrize("cmd,args,want", CASES)
def test_bad_input_is_one_line_and_exit_2(cmd, args, want):
    p = run_udamon(cmd, *args)
    assert p.returncode == 2, (args, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert want in lines[0], lines[0]


def test_report_dirty_bandwidth_needs_a_dirty_rate_record(tmp_path):
    """--bandwidth on a region record: one line, exit 2 (the demo record is one)."""
    csv, rec = tmp_path / "demo.csv", tmp_path / "demo.jsonl"
    run_udamon("synth", "-o", str(csv), check=True)
    run_udamon("record", "--input", str(csv), "--breakdown", "rw", "-o", str(rec), check=True)
    p = run_udamon("report", "dirty", "-i", str(rec), "--bandwidth", "1Gbit/s")
    assert p.returncode == 2 and "need a record of 'udamon dirty-rate'" in p.stderr
    p = run_udamon("report", "dirty", "-i", str(rec), "--format", "json")
    assert p.returncode == 0 and '"window_ns"' in p.stdout
    p = run_udamon("report", "ksm", "-i", str(rec), "--format", "json")
    assert p.returncode == 0 and '"predicted_saving": null' in p.stdout
