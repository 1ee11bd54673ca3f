"""``udamon monitor``: watch a live session in the terminal."""

from __future__ import annotations

import argparse

from udamon.cli import live
from udamon.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "monitor", help="show the hottest regions per probe, live",
        description="Monitor like 'udamon record' and show, refreshed every aggregation "
                    "interval, the hottest regions by nr_accesses and by each probe.  Ctrl-C "
                    "stops.  With -o it also writes the record.")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="regions per table (default 10)")
    p.add_argument("-o", "--output", metavar="FILE", help="also write a record file")
    live.add_session_args(p, replay=False)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from udamon.record.sink import RecordSink
    from udamon.report.live_view import LiveView

    if a.top <= 0:
        raise UsageError("--top must be positive")
    spec = live.resolve(a, replay=False)
    sinks = [LiveView(a.top)] + ([RecordSink(a.output, True)] if a.output else [])
    return live.run_session(a, spec, sinks, progress=False)
