"""``udamon record``: monitor targets and write a record file."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from udamon.cli.common import (
    FILTER_HELP,
    add_filter_args,
    add_monitoring_args,
    attrs_from_args,
    duration_arg,
    filters_from_args,
    parse_ranges,
    pid_list,
    probes_from_args,
    typed,
)
from udamon.core.monitor import Monitor
from udamon.core.session import SessionResult, StopFlag, run_replay
from udamon.errors import UsageError
from udamon.primitives import registry
from udamon.primitives.replay import ReplayPrimitive, derive_ranges
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
  udamon record --primitive replay --input accesses.csv -o rec.jsonl
  udamon record --input accesses.csv --cpus 0 --probe writes=write --probe cpu1=cpus:1 -o rec.jsonl
  udamon record --input accesses.csv --filter 'nodes:1,!threads:1234' \\
      --range 0x7f00000000-0x7f40000000 -o r.jsonl
"""


def add_parser(sub) -> None:
    p = sub.add_parser("record", help="monitor and write a record file",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="record file to write")
    p.add_argument("--primitive", default="auto", choices=registry.names(),
                   help="how accesses are seen (default auto: replay when --input is given, "
                        "else the best live primitive this machine has)")
    p.add_argument("--input", metavar="CSV",
                   help="replay input: CSV with header time_ns,pid,tid,cpu,addr,size,write")
    p.add_argument("--pid", metavar="PID[,PID...]", action="append", default=[],
                   type=typed(pid_list, "pid list"),
                   help="target process(es); with --input, which pids of the input to monitor "
                        "(default: all)")
    p.add_argument("--range", metavar="START-END", action="append", default=[],
                   help="monitor this address range (repeatable; decimal or 0x-hex) instead of "
                        "the process's mappings or, for replay, the ranges the reports touch")
    p.add_argument("--duration", metavar="DUR", type=typed(duration_arg, "duration"),
                   help="stop after this long (live primitives; default: until the targets "
                        "exit or Ctrl-C)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_filter_args(p)
    add_monitoring_args(p)
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND ARGS: launch and monitor a command")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    attrs = attrs_from_args(a)
    filters = filters_from_args(a)
    probes = probes_from_args(a)
    ranges = parse_ranges(a.range)
    pids = [p for group in a.pid for p in group]
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    prim = a.primitive
    if prim == "auto":
        prim = "replay" if a.input else registry.best_live()
    if prim == "replay":
        if not a.input:
            raise UsageError("--primitive replay needs --input FILE")
        if command:
            raise UsageError("replay reads recorded reports; it cannot launch a command")
        return _record_replay(a, attrs, filters, probes, ranges, pids)
    if a.input:
        raise UsageError(f"--input is for the replay primitive, not {prim}")
    return registry.record_live(prim, a, attrs, filters, probes, ranges, pids, command)


def _install_stop() -> StopFlag:
    stop = StopFlag()

    def handler(signum, frame):
        stop.set("interrupted")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _record_replay(a, attrs, filters, probes, ranges, pids) -> int:
    if not os.path.exists(a.input):
        raise UsageError(f"--input {a.input}: no such file")
    per_pid = derive_ranges(a.input) if ranges is None or not pids else {}
    targets = pids or sorted(per_pid)
    if not targets:
        raise UsageError(f"{a.input}: holds no reports, nothing to monitor")
    monitor = Monitor(attrs, filters, probes, seed=a.seed)
    for pid in targets:
        r = ranges if ranges is not None else per_pid.get(pid)
        if not r:
            raise UsageError(f"pid {pid} has no reports in {a.input}; pids there: "
                             f"{', '.join(map(str, sorted(per_pid))) or 'none'}")
        monitor.add_target(pid, r, name=f"replay:{pid}")
    prim = ReplayPrimitive(a.input)
    writer = RecordWriter(a.output)
    writer.write_header(build_header(attrs, "replay", prim.coverage, filters, probes,
                                     monitor.targets, input=os.path.abspath(a.input)))
    stop = _install_stop()
    progress = _Progress(not a.quiet and sys.stderr.isatty())
    try:
        res = run_replay(monitor, prim.chunks(), writer.write_snapshot, stop,
                         progress.update)
    except BaseException:
        progress.done()
        st = monitor.stats
        writer.close("error", dropped_reports=st.dropped, lost_samples=0)
        raise
    progress.done()
    return finish(writer, monitor, res, a.quiet)


def finish(writer: RecordWriter, monitor: Monitor, res: SessionResult, quiet: bool) -> int:
    st = monitor.stats
    extra = {"reports": st.accepted, "unmatched_reports": st.unmatched,
             "outside_reports": st.outside, "late_reports": st.late}
    if res.error:
        extra["error"] = res.error
    writer.close(res.reason, dropped_reports=st.dropped, lost_samples=res.lost_samples, **extra)
    if not quiet:
        msg = (f"udamon: wrote {writer.snapshots} snapshots to {writer.path} "
               f"({res.reason}; {st.accepted} reports")
        if st.dropped:
            msg += f", {st.dropped} DROPPED (buffer full)"
        if res.lost_samples:
            msg += f", {res.lost_samples} samples lost by the kernel"
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
