"""``udamon record``: monitor targets and write a record file."""

from __future__ import annotations

import argparse
import os
import sys

from udamon.cli import live
from udamon.cli.common import (
    FILTER_HELP,
)
from udamon.core.monitor import Monitor
from udamon.core.session import SessionResult, run_replay
from udamon.errors import UsageError
from udamon.primitives.perf_script import PerfScriptStats, read_perf_script
from udamon.primitives.replay import CHUNK, ReplayPrimitive, columns, read_csv, summarize
from udamon.record.writer import RecordWriter, build_header

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
    live.add_session_args(p, replay=True)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    s = live.resolve(a, replay=True)
    if s.primitive == "replay":
        return _record_replay(a, s.attrs, s.filters, s.probes, s.kinds, s.ranges, s.pids)
    return live.run_session(a, s, [RecordSink(a.output, a.quiet)])


def _record_replay(a, attrs, filters, probes, breakdown, ranges, pids) -> int:
    if not os.path.exists(a.input):
        raise UsageError(f"--input {a.input}: no such file")
    _check_not_input(a.input, a.output)
    perf = a.input_format == "perf-script"
    stats = PerfScriptStats() if perf else None

    def reader(path, chunk=CHUNK, linenos=None, stats=None):
        if perf:
            return read_perf_script(path, chunk, linenos, stats)
        return read_csv(path, chunk, linenos)

    summary = (summarize(a.input, reader=reader) if ranges is None or not pids or breakdown
               else None)
    per_pid = summary.ranges if summary else {}
    targets = pids or sorted(per_pid)
    if summary and breakdown:
        probes = live.add_breakdown(probes, breakdown, cpus=summary.cpus, nodes=summary.nodes,
                                tids=set().union(*[summary.tids.get(p, set()) for p in targets]))
    if not targets:
        raise UsageError(f"{a.input}: holds no reports, nothing to monitor")
    _warn_derived_nodes(a.input, filters, probes, breakdown, perf)
    monitor = Monitor(attrs, filters, probes, seed=a.seed)
    for pid in targets:
        r = ranges if ranges is not None else per_pid.get(pid)
        if not r:
            raise UsageError(f"pid {pid} has no reports in {a.input}; pids there: "
                             f"{', '.join(map(str, sorted(per_pid))) or 'none'}")
        monitor.add_target(pid, r, name=f"replay:{pid}")
    prim = ReplayPrimitive(a.input, reader=lambda p, c, ln: reader(p, c, ln, stats))
    if perf:  # faults and precise samples see some accesses, not all of them
        prim.coverage = "unknown"
    writer = RecordWriter(a.output)
    extra = {"input_format": "perf-script"} if perf else {}
    writer.write_header(build_header(attrs, "replay", prim.coverage, filters, probes,
                                     monitor.targets, input=os.path.abspath(a.input),
                                     written_pages=monitor.count_written_pages, **extra))
    stop = live.install_stop()
    progress = _Progress(not a.quiet and sys.stderr.isatty())
    try:
        res = run_replay(monitor, prim.chunks(), writer.write_snapshot, stop,
                         progress.update, where=prim.where)
    except BaseException:
        progress.done()
        st = monitor.stats
        writer.close("error", dropped_reports=st.dropped, lost_samples=0)
        raise
    progress.done()
    rc = finish(writer, monitor, res, a.quiet, notes=stats.notes() if stats else None)
    _warn_outside(monitor, ranges is not None)
    return rc


def _warn_derived_nodes(path: str, filters, probes, breakdown, perf: bool = False) -> None:
    """Without a node column, a report's node is looked up from its CPU in this
    machine's topology (the intake does it), which may not be the recorded machine's."""
    uses = any(f.type == "nodes" for f in [*filters, *(f for p in probes for f in p.filters)])
    if (uses or "node" in breakdown) and (perf or "node" not in columns(path)):
        from udamon.targets.topology import cpu_to_node

        n = len({int(x) for x in cpu_to_node() if x >= 0}) or 1
        print(f"udamon: warning: {path} has no 'node' column: nodes are derived from each "
              f"report's CPU with this machine's CPU-to-node map ({n} node"
              f"{'s' if n != 1 else ''}); add a node column for another machine's input",
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


def finish(writer: RecordWriter, monitor: Monitor, res: SessionResult, quiet: bool,
           notes: list[str] | None = None) -> int:
    st = monitor.stats
    extra = {"reports": st.accepted, "unmatched_reports": st.unmatched,
             "outside_reports": st.outside, "late_reports": st.late}
    extra.update(res.end)
    if notes:
        extra["notes"] = notes
    if res.error:
        extra["error"] = res.error
    writer.close(res.reason, dropped_reports=st.dropped, lost_samples=res.lost_samples, **extra)
    if not quiet:
        msg = (f"udamon: wrote {writer.snapshots} snapshots to {writer.path} "
               f"({res.reason}; {st.accepted} reports")
        if st.dropped:
            msg += f", {st.dropped} DROPPED (buffer full)"
        if res.lost_samples:
            msg += f", {res.lost_samples} lost before udamon read them"
        print(msg + ")", file=sys.stderr)
    return 0


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


class RecordSink:
    """Writes the record file of a live session."""

    def __init__(self, path: str, quiet: bool):
        self.path = path
        self.quiet = quiet
        self.writer: RecordWriter | None = None

    def begin(self, header: dict, monitor: Monitor) -> None:
        self.writer = RecordWriter(self.path)
        self.writer.write_header(header)

    def snapshot(self, snap) -> None:
        assert self.writer is not None
        self.writer.write_snapshot(snap)

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        assert self.writer is not None
        finish(self.writer, monitor, res, self.quiet, notes=notes)

    def fail(self, error: str) -> None:
        if self.writer is not None and not self.writer.closed:
            self.writer.close("error", error=error)
