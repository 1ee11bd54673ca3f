"""Where a live session's CPU goes per aggregation interval, step by step.

    sudo .venv/bin/python bench/profile_aggregation.py [--rate 0] [--duration 20]
        [--pure-python] [-- extra 'udamon record' options]

Runs ``udamon record --primitive hint`` in this process on ``bench/workloads/faults``
(``--rate`` user page faults per second; 0: an idle target) and wraps the steps
of the loop (waiting for the tracer, reading it, counting, merging, splitting,
writing the line) with thread CPU-time counters, then prints each step's CPU per
aggregation.  Unlike cProfile it adds ~1 us per wrapped call, so the numbers
are what the session costs; steps nest (``close_window`` holds ``merge``).
This is how bench/analysis.md found the idle session's cost: after each 100 ms
sleep, caches are cold and every small numpy call costs several microseconds.
``--pure-python`` sets UDAMON_PURE_PYTHON=1 (the numpy region walk and the
Python loop, as an install without the C extensions runs).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile
import time

from common import build, start_json_workload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=0, help="faults per second (default 0)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds (default 20)")
    ap.add_argument("--pure-python", action="store_true")
    ap.add_argument("extra", nargs="*", help="more 'udamon record' options, after --")
    a = ap.parse_args()
    if a.pure_python:
        os.environ["UDAMON_PURE_PYTHON"] = "1"
    if os.geteuid() != 0:
        print("profile_aggregation: needs root (hint reads a tracepoint)", file=sys.stderr)
        return 2

    import udamon.core.monitor as monitor
    import udamon.core.names as names
    import udamon.core.regions as regions
    import udamon.intake.buffer as buffer
    import udamon.primitives.hint as hint
    import udamon.record.writer as writer
    import udamon.system.perf_tracepoint as tracepoint
    import udamon.targets.page_nodes as page_nodes
    from udamon.cli.main import main as udamon_main

    cpu: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    closes: list[int] = []  # the main thread's CPU time at each interval's close

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*args, **kw):
            t = time.thread_time_ns()
            if label == "close_window":
                closes.append(t)
            try:
                return f(*args, **kw)
            finally:
                cpu[label] += time.thread_time_ns() - t
                calls[label] += 1
        setattr(owner, name, timed)

    for owner, name, label in [
            (monitor.Monitor, "_close_window", "close_window"),
            (monitor.Monitor, "_check_accesses", "  check_accesses (take + count)"),
            (monitor.Monitor, "_count", "    count"),
            (buffer.ReportBuffer, "take_before", "    buffer take"),
            (monitor.Monitor, "_merge_regions", "  merge_regions (ages + merge)"),
            (regions.Regions, "merge", "    merge"),
            (monitor.Monitor, "_snapshot", "  snapshot (page nodes, copies)"),
            (monitor.Monitor, "_split_regions", "  split_regions"),
            (monitor.Monitor, "update_ranges", "  update_ranges (memory map)"),
            (writer.RecordWriter, "write_snapshot", "write_snapshot (JSON line)"),
            (hint.HintPrimitive, "wait", "hint wait (poll, sleeping)"),
            (hint.HintPrimitive, "poll", "hint poll (read the tracer)"),
            (tracepoint.FaultTracer, "read", "  tracer read + parse"),
            (tracepoint.FaultTracer, "read_reports", "  tracer read_reports (C)"),
            (names.NameTracker, "annotate", "region names (annotate)"),
            (page_nodes.PageNodeLookup, "annotate", "page-node lookup (move_pages)"),
            (hint.HintPrimitive, "exited", "hint exited (pidfd poll)"),
            (monitor.Monitor, "report_batch", "report_batch (buffer add)")]:
        wrap(owner, name, label)

    wl, info = start_json_workload([build("faults"), str(a.rate), str(a.duration + 30)])
    fd, rec = tempfile.mkstemp(prefix="udamon-prof-", suffix=".jsonl")
    os.close(fd)
    t0 = time.thread_time_ns()
    try:
        rc = udamon_main(["record", "--primitive", "hint", "-q", "--pid", str(info["pid"]),
                          "--duration", f"{a.duration}s", "-o", rec, *a.extra])
    finally:
        wl.terminate()
        wl.wait(30)
        os.unlink(rec)
    total = time.thread_time_ns() - t0
    n = max(calls["close_window"], 1)
    print(f"{n} aggregations in {a.duration:.0f} s at {a.rate} faults/s"
          f"{' (pure Python)' if a.pure_python else ''}; main thread CPU "
          f"{total / 1e6:.0f} ms incl. start-up")
    order = ["close_window", "  check_accesses (take + count)", "    count", "    buffer take",
             "  merge_regions (ages + merge)", "    merge", "  snapshot (page nodes, copies)",
             "  split_regions", "  update_ranges (memory map)", "write_snapshot (JSON line)",
             "hint wait (poll, sleeping)", "hint poll (read the tracer)",
             "  tracer read + parse", "  tracer read_reports (C)", "hint exited (pidfd poll)",
             "report_batch (buffer add)", "region names (annotate)",
             "page-node lookup (move_pages)"]
    for label in order:
        print(f"  {label:36s} {cpu[label] / n / 1000:8.1f} us per aggregation")
    if len(closes) > 2:  # steady: from the first interval's close to the last's
        steady = (closes[-1] - closes[0]) / (len(closes) - 1)
        top = sum(cpu[x] for x in order if not x.startswith(" ")) / n
        print(f"  {'steady main-thread CPU, all steps':36s} {steady / 1000:8.1f} us per "
              f"aggregation ({steady / 1000 - top / 1000:.1f} us outside the steps above)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
