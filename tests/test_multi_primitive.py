"""Several primitives in one session: ``--primitive hint,wp`` on the pinned workload.

hint sees reads and writes with their CPU (the kernel's NUMA scanner decides when), wp
samples writes the DAMON way (one page per region per interval, nr_accesses).  One
record must hold both: wp drives nr_accesses (the session filters ``source:wp``), the
probes count each source apart.  Ground truth: tests/workloads/access_pattern.c (R read
by the reader on CPU 0, W written by the writer on CPU 1).  Needs root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_udamon

from udamon.primitives.hint import hint_available
from udamon.primitives.uffd import wp_available
from udamon.system.perf_tracepoint import online_cpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads.build import BuildError, build  # noqa: E402

_root = os.geteuid() == 0
_ok = _root and hint_available()[0] and wp_available()[0]
pytestmark = [pytest.mark.skipif(not _ok, reason="needs root, hint and wp"),
              pytest.mark.skipif(not {0, 1} <= set(online_cpus()), reason="needs CPUs 0, 1")]


def test_hint_and_wp_in_one_record(tmp_path):
    try:
        ap = build("access_pattern")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")
    wl = subprocess.Popen([ap, "--duration", "120", "--size", "16", "--reader-cpu", "0",
                           "--writer-cpu", "1"], stdout=subprocess.PIPE, text=True)
    rec = tmp_path / "r.jsonl"
    try:
        info = json.loads(wl.stdout.readline())
        probes = []
        for b in "RW":
            a = f"addr:{info[b][0]:#x}-{info[b][1]:#x}"
            probes += ["--probe", f"{b}_hint={a},source:hint",
                       "--probe", f"{b}_hint_c0={a},source:hint,cpus:0",
                       "--probe", f"{b}_hint_c1={a},source:hint,cpus:1",
                       "--probe", f"{b}_wp={a},source:wp"]
        p = run_udamon("record", "--primitive", "hint,wp", "--pid", str(info["pid"]),
                       "--duration", "10s", *probes, "-o", str(rec), timeout=120)
        assert p.returncode == 0, p.stderr
        assert "source:wp" in p.stderr  # the session says what drives nr_accesses
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(30) == 0  # the workload's data are intact
    lines = [json.loads(x) for x in open(rec)]
    header, snaps = lines[0], [x for x in lines[1:] if "regions" in x]
    assert header["primitive"] == "hint,wp"
    assert {(x["name"], x["kind"]) for x in header["primitives"]} == {
        ("hint", "observational"), ("wp", "controlled")}
    assert header["coverage"] == "controlled"
    assert header["filters"][0]["type"] == "source" and header["filters"][0]["value"] == "wp"
    hits: dict[str, int] = {}
    for s in snaps:
        for g in s["regions"]:
            for k, v in g["probes"].items():
                hits[k] = hits.get(k, 0) + v
    print(hits)
    # wp: write samples on W, never on the read-only R
    assert hits["W_wp"] > 0 and hits["R_wp"] == 0
    # hint: who -- every hint hit on R from the reader's CPU, on W from the writer's
    assert hits["R_hint"] + hits["W_hint"] > 0, "the NUMA scanner saw nothing in 10 s"
    if hits["R_hint"]:
        assert hits["R_hint_c0"] >= 0.95 * hits["R_hint"]
    if hits["W_hint"]:
        assert hits["W_hint_c1"] >= 0.95 * hits["W_hint"]
    # nr_accesses is wp's alone: no region over R counts an access (hint reads do not)
    for s in snaps:
        for g in s["regions"]:
            if info["R"][0] <= g["start"] and g["end"] <= info["R"][1]:
                assert g["nr_accesses"] == 0, g
