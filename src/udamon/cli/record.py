"""``udamon record``: monitor targets and write a record file."""

from __future__ import annotations

import argparse
import os
import sys

from udamon.cli import live
from udamon.cli.common import (
    FILTER_HELP,
    probe_weights,
)
from udamon.core.monitor import Monitor
from udamon.core.session import Session
from udamon.errors import UsageError
from udamon.primitives.replay import columns
from udamon.probes.breakdown import AUTO
from udamon.record.report_stream import ReportStreamSink
from udamon.record.sink import RecordSink

DESCRIPTION = """\
Monitor data accesses and write a record file (JSON Lines; gzip when FILE ends in .gz).

Every aggregation interval, each target's regions are written with nr_accesses
(the sampling intervals in which a report that passed the sample filters landed
in the region), age, and one hit counter per probe.  Read it with
'udamon report access -i FILE'.
"""

EPILOG = FILTER_HELP + """

examples:
  udamon record --primitive hint --pid 1234 --breakdown cpu,rw --duration 10s -o rec.jsonl
  udamon record --primitive wp --pid 1234 --write-only --breakdown cpu -o rec.jsonl
  udamon record --primitive hint -o rec.jsonl -- ./program args
  udamon record --primitive replay --input accesses.csv -o rec.jsonl
  udamon record --input accesses.csv --cpus 0 --probe writes=write --probe cpu1=cpus:1 -o rec.jsonl
  udamon record --input accesses.csv --filter 'nodes:1,!threads:1234' \\
      --range 0x7f00000000-0x7f40000000 -o r.jsonl

reports from other programs (--primitive external; docs/report-channel.md):
  udamon record --primitive external --socket /run/udamon.sock --pid 1234 -o rec.jsonl
      (producers: python -m udamon.reporter, the C header udamon_report.h)
  producer | udamon record --input - --pid 1234 --breakdown cpu,rw -o rec.jsonl
      (CSV lines with a header, or binary records; time_ns on CLOCK_MONOTONIC or 0)

perf's own data (--input-format perf-script):
  perf record -e page-faults -c 1 -d --sample-cpu -p 1234 -- sleep 10
  perf script -F pid,tid,cpu,time,event,addr --ns > pf.txt
  udamon record --input pf.txt --input-format perf-script --breakdown cpu -o rec.jsonl
  (perf mem samples: -F pid,tid,cpu,time,event,addr,data_src,weight; the fault
  tracepoint: -F pid,tid,cpu,time,event,trace)
"""


def add_parser(sub) -> None:
    p = sub.add_parser("record", help="monitor and write a record file",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="record file to write")
    p.add_argument("--keep-reports", metavar="FILE",
                   help="also keep every report counted, page node included, in FILE "
                        "(gzip CSV, the --input format), so that other filters, probes or "
                        "breakdowns can be counted later: udamon record --input FILE ...")
    live.add_session_args(p, replay=True)
    p.set_defaults(func=run)


def _sinks(a: argparse.Namespace) -> list:
    """The record, and first the report stream: its note goes into the record's end."""
    sinks: list = [RecordSink(a.output, a.quiet)]
    if a.keep_reports:
        for other, what in ((a.output, "-o"), (getattr(a, "input", None), "--input")):
            if other and os.path.abspath(other) == os.path.abspath(a.keep_reports):
                raise UsageError(f"--keep-reports {a.keep_reports} is also the {what} file")
        sinks.insert(0, ReportStreamSink(a.keep_reports))
    return sinks


def run(a: argparse.Namespace) -> int:
    s = live.resolve(a, replay=True)
    if s.primitive == "replay":
        return _record_replay(a, s)
    if not a.breakdown:  # a live record keeps what later reports need
        s.kinds = [AUTO]
    return live.run_session(a, s, _sinks(a))


def _record_replay(a: argparse.Namespace, s: live.SessionSpec) -> int:
    if not os.path.exists(a.input):
        raise UsageError(f"--input {a.input}: no such file")
    _check_not_input(a.input, a.output)
    session = Session(primitive="replay", input=a.input, input_format=a.input_format,
                      pids=s.pids, attrs=s.attrs, filters=s.filters, probes=s.probes,
                      breakdown=s.kinds, ranges=s.ranges, seed=a.seed,
                      regions_follow_origin=a.regions_follow_origin,
                      probe_weights=probe_weights(a), cpu_nodes=a.cpu_nodes,
                      stop=live.install_stop())
    session.start()
    assert session.monitor is not None
    if a.cpu_nodes is None:
        _warn_derived_nodes(a.input, session.monitor.filters, session.monitor.probes,
                            s.kinds, a.input_format == "perf-script")
    progress = _Progress(not a.quiet and sys.stderr.isatty())
    session.progress = progress.update
    try:
        session.run(_sinks(a))
    finally:
        progress.done()
    _warn_outside(session.monitor, s.ranges is not None)
    return 0


def _warn_derived_nodes(path: str, filters, probes, breakdown, perf: bool = False) -> None:
    """Without a node column, a report's node is looked up from its CPU in this
    machine's topology unless --cpu-nodes gives the recorded machine's."""
    uses = any(f.type == "nodes" for f in [*filters, *(f for p in probes for f in p.filters)])
    if (uses or "node" in breakdown) and (perf or "node" not in columns(path)):
        from udamon.targets.topology import cpu_to_node

        n = len({int(x) for x in cpu_to_node() if x >= 0}) or 1
        print(f"udamon: warning: {path} has no 'node' column: nodes are derived from each "
              f"report's CPU with this machine's CPU-to-node map ({n} node"
              f"{'s' if n != 1 else ''}); for another machine's input add a node column or "
              "give its map with --cpu-nodes",
              file=sys.stderr)


def _warn_outside(monitor: Monitor, given_ranges: bool) -> None:
    """Reports outside every monitored range are not counted: say how many."""
    st = monitor.stats
    if st.outside and st.accepted:
        where = "the --range ranges" if given_ranges else "the monitored ranges"
        print(f"udamon: warning: {st.outside} of {st.accepted} reports "
              f"({100 * st.outside / st.accepted:.1f}%) fell outside {where} and were not "
              "counted", file=sys.stderr)


def _check_not_input(inp: str, out: str) -> None:
    """Opening the output truncates it: when it is the input, the input is gone."""
    same = os.path.abspath(inp) == os.path.abspath(out)
    try:
        same = same or os.path.samefile(inp, out)
    except OSError:  # the output does not exist yet
        pass
    if same:
        raise UsageError(f"-o {out} is the --input file; writing the record would destroy "
                         "the input (choose another output file)")


class _Progress:
    """Reports processed so far, on stderr when it is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.n = 0
        self._p = None
        if enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._p = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                               TimeElapsedColumn(), transient=True)
            self._p.start()
            self._task = self._p.add_task("replaying: 0 reports")

    def update(self, n: int) -> None:
        self.n += n
        if self._p is not None:
            self._p.update(self._task, description=f"replaying: {self.n:,} reports")

    def done(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
