#!/usr/bin/env python3
"""How the kernel primitive should read a kdamond's aggregations: tracepoints or tried_regions.

    python3 bench/bench_kernel_reader.py [--seconds 8] [--json FILE]

Needs root and a kernel DAMON that udamon may use (the Linux 7.3 guest:
``python3 tests/guest/run.py --shell 'python3 bench/bench_kernel_reader.py'``).
For each reader (``tracepoint``: the kdamond's damon:damon_aggregated events;
``tried-regions``: the stat scheme's tried_regions after every aggregation) and
region count (min_nr_regions 10 and 200), a kernel primitive watches the pinned
workload (tests/workloads/access_pattern.c) for ``--seconds``.  The ground truth
of how many aggregations the kdamond ended is the tracepoint stream, which the
tried-regions run opens too (read once, at the end).  Reported per run: the
aggregations the kdamond ended, those the reader delivered, and udamon's CPU
time per delivered aggregation (process CPU time of the reading loop).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from workloads.build import build  # noqa: E402

from udamon.core.attrs import Attrs  # noqa: E402
from udamon.primitives.kernel import KernelPrimitive  # noqa: E402
from udamon.system.kernel_trace import AggregationTracer, Grouper  # noqa: E402


def run_one(pid: int, reader: str, min_regions: int, seconds: float) -> dict:
    attrs = Attrs(5_000, 100_000, 1_000_000, min_regions, max(1000, 2 * min_regions))
    prim = KernelPrimitive(attrs, reader=reader)
    prim.start([pid])
    truth = None
    if reader == "tried-regions":  # count what the kdamond really ended
        kd = prim.kdamond
        assert kd is not None
        truth = AggregationTracer(kd.pid, 0, pages=4096).open()
    got = regions = 0
    c0, t0 = time.process_time(), time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            prim.wait(0.1)
            for a in prim.aggregations():
                got += 1
                regions += len(a.start)
        cpu = time.process_time() - c0
        wall = time.monotonic() - t0
    finally:
        if truth is not None:
            g = Grouper(attrs.aggr_us * 1000)
            ended = len(g.feed(truth.read()))
            truth.close()
        prim.stop()
    if truth is None:
        ended = got + prim.stats().end["kernel"]["broken_aggregations"]
    return {"reader": reader, "min_nr_regions": min_regions, "seconds": round(wall, 2),
            "aggregations_ended": ended, "aggregations_read": got,
            "read_share": round(got / ended, 3) if ended else None,
            "mean_regions": round(regions / got, 1) if got else 0,
            "cpu_ms_per_read_aggregation": round(1000 * cpu / got, 2) if got else None,
            "cpu_share": round(cpu / wall, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    wl = subprocess.Popen([build("access_pattern"), "--duration", "600", "--size", "8",
                           "--reader-cpu", "0", "--writer-cpu", "1"], stdout=subprocess.PIPE,
                          text=True)
    info = json.loads(wl.stdout.readline())
    rows = []
    try:
        for min_regions in (10, 200):
            for reader in ("tracepoint", "tried-regions"):
                r = run_one(info["pid"], reader, min_regions, a.seconds)
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        wl.terminate()
        wl.wait(30)
    out = {"host": os.uname().release, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print("| reader | min regions | mean regions | aggregations ended | read | udamon CPU "
          "per read aggregation | udamon CPU share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['reader']} | {r['min_nr_regions']} | {r['mean_regions']} | "
              f"{r['aggregations_ended']} | {r['aggregations_read']} ({r['read_share']:.0%}) | "
              f"{r['cpu_ms_per_read_aggregation']} ms | {r['cpu_share']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
