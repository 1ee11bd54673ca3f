"""``udamon exporter``: serve Prometheus metrics of a live monitoring session."""

from __future__ import annotations

import argparse
import sys

from udamon.cli import live
from udamon.errors import UsageError
from udamon.report.thread_labels import DEFAULT_CAP


def add_parser(sub) -> None:
    p = sub.add_parser(
        "exporter", help="serve Prometheus metrics of a live session over HTTP",
        description="Monitor like 'udamon record' and serve metrics at "
                    "http://BIND:PORT/metrics, updated every aggregation interval: per target "
                    "udamon_wss_bytes, udamon_write_bytes_per_second, "
                    "udamon_written_bytes_total, udamon_node_access_bytes_total{node}, "
                    "udamon_node_access_ratio{node}, udamon_local_access_ratio, "
                    "udamon_reports (labels pid, comm); per thread (labels pid, comm, tid, "
                    "thread: the thread's name) udamon_thread_accesses_total, "
                    "udamon_thread_local_access_ratio, udamon_thread_access_bytes_total "
                    "(with --breakdown thread), at most --thread-labels threads per target "
                    "with their own labels, the others summed under tid=\"other\"; "
                    "udamon_dropped_reports_total, udamon_lost_samples_total. "
                    "The *_total metrics are counters (use rate() or increase()); other "
                    "paths than /metrics and / answer 404.  "
                    "Adds --breakdown node,rw automatically.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=9977, help="TCP port (default 9977; 0: any free)")
    p.add_argument("-o", "--output", metavar="FILE", help="also write a record file")
    p.add_argument("--thread-labels", type=int, default=DEFAULT_CAP, metavar="N",
                   help=f"threads per target with their own tid/thread labels, the busiest "
                        f"first (default {DEFAULT_CAP}; the others are summed under "
                        "tid=\"other\"; 0: only \"other\")")
    live.add_session_args(p, replay=False)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from udamon.record.sink import RecordSink
    from udamon.report.exporter import MetricsSink

    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {a.port}")
    if not 0 <= a.thread_labels <= 10_000:
        raise UsageError(f"--thread-labels must be 0..10000, got {a.thread_labels}")
    a.breakdown = [*a.breakdown, "node,rw"]
    spec = live.resolve(a, replay=False)
    spec.kinds = list(dict.fromkeys(spec.kinds))
    metrics = MetricsSink(thread_labels=a.thread_labels)
    try:
        port = metrics.serve(a.bind, a.port)
    except OSError as e:
        raise UsageError(f"cannot listen on {a.bind}:{a.port}: {e.strerror}") from None
    print(f"udamon: serving metrics on http://{a.bind}:{port}/metrics", file=sys.stderr,
          flush=True)
    sinks = [metrics] + ([RecordSink(a.output, a.quiet)] if a.output else [])
    try:
        return live.run_session(a, spec, sinks, progress=False)
    finally:
        metrics.stop_serving()
