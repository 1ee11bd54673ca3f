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
from udamon.core.session import SessionResult, StopFlag, run_live, run_replay
from udamon.errors import UsageError
from udamon.primitives import registry
from udamon.primitives.replay import ReplayPrimitive, summarize
from udamon.probes import breakdown as breakdown_mod
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
    p.add_argument("--breakdown", metavar="KIND[,KIND]", action="append", default=[],
                   help="add automatic probes: cpu (cpu:<n> per CPU), node (node:<n>), "
                        "thread (thread:<tid> per thread present at start), rw (write, read)")
    p.add_argument("--no-page-nodes", action="store_true",
                   help="live primitives: do not sample which NUMA node holds each region's "
                        "pages (by default 2 random pages per region per aggregation, with "
                        "move_pages(2) in query mode; 'report numa' uses them)")
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
    try:
        breakdown = breakdown_mod.parse_kinds(a.breakdown)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
        return _record_replay(a, attrs, filters, probes, breakdown, ranges, pids)
    if a.input:
        raise UsageError(f"--input is for the replay primitive, not {prim}")
    if bool(pids) == bool(command):
        raise UsageError("give the target: --pid PID or -- COMMAND ARGS (one of them)")
    return _record_live(a, prim, attrs, filters, probes, breakdown, ranges, pids, command)


def _install_stop() -> StopFlag:
    stop = StopFlag()

    def handler(signum, frame):
        stop.set("interrupted")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _add_breakdown(probes, breakdown, **who):
    try:
        extra = breakdown_mod.breakdown_probes(breakdown, **who)
    except ValueError as e:
        raise UsageError(str(e)) from None
    clash = {p.name for p in probes} & {p.name for p in extra}
    if clash:
        raise UsageError(f"--probe names clash with --breakdown probes: {', '.join(sorted(clash))}")
    return probes + extra


def _record_replay(a, attrs, filters, probes, breakdown, ranges, pids) -> int:
    if not os.path.exists(a.input):
        raise UsageError(f"--input {a.input}: no such file")
    summary = summarize(a.input) if ranges is None or not pids or breakdown else None
    per_pid = summary.ranges if summary else {}
    targets = pids or sorted(per_pid)
    if summary and breakdown:
        probes = _add_breakdown(probes, breakdown, cpus=summary.cpus, nodes=summary.nodes,
                                tids=set().union(*[summary.tids.get(p, set()) for p in targets]))
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


def _record_live(a, prim_name, attrs, filters, probes, breakdown, ranges, pids,
                 command) -> int:
    from udamon.errors import TargetGone
    from udamon.primitives.perf_tracepoint import online_cpus
    from udamon.targets.launch import Launched
    from udamon.targets.procmaps import read_vmas, thread_ids
    from udamon.targets.topology import cpu_to_node

    entry = registry.entry(prim_name)
    for pid in pids:
        try:
            read_vmas(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
    primitive = registry.make_live(prim_name, attrs)
    stop = _install_stop()
    launched = Launched(command) if command else None
    targets = [launched.pid] if launched else pids
    writer = None
    started = False
    try:
        if launched and entry.attach_before_exec:
            primitive.start(targets)
            started = True
            launched.release()
        elif launched:
            launched.release()
        if not started:
            primitive.start(targets)
            started = True
        if breakdown:
            cpus = online_cpus()
            table = cpu_to_node()
            nodes = {int(table[c]) for c in cpus if c < table.size and table[c] >= 0}
            tids = set()
            for pid in targets:
                try:
                    tids.update(thread_ids(pid))
                except TargetGone:
                    pass
            probes = _add_breakdown(probes, breakdown, cpus=cpus, nodes=nodes, tids=tids)
        monitor = Monitor(attrs, filters, probes, seed=a.seed)
        for pid in targets:
            monitor.add_target(pid, ranges)
        writer = RecordWriter(a.output)
        extra = {"command": command} if command else {}
        start_notes = primitive.stats().notes
        writer.write_header(build_header(attrs, prim_name, primitive.coverage, filters, probes,
                                         monitor.targets, clock="monotonic", notes=start_notes,
                                         **extra))
        progress = _LiveProgress(not a.quiet and sys.stderr.isatty(), a.duration)
        try:
            res = run_live(monitor, primitive, writer.write_snapshot, duration_ns=a.duration,
                           stop=stop, on_tick=progress.update,
                           annotate=None if a.no_page_nodes else _page_node_sampler(a.seed))
        finally:
            progress.done()
        notes = [n for n in primitive.stats().notes if n not in start_notes]
        rc = finish(writer, monitor, res, a.quiet, notes=notes)
    except BaseException as e:
        primitive.stop()  # idempotent; restores system settings
        if writer is not None and not writer.closed:
            writer.close("error", error=str(e) or type(e).__name__)
        if launched and launched.poll() is None and not started:
            launched.release()
        raise
    if launched and launched.poll() is None:
        if not a.quiet:
            print(f"udamon: recording done; waiting for {command[0]} (pid {launched.pid}) "
                  "to exit (Ctrl-C passes on to it)", file=sys.stderr)
        launched.wait_forwarding_signals()
    if launched and not a.quiet:
        print(f"udamon: {command[0]} exited with status {launched.returncode}", file=sys.stderr)
    return rc


def finish(writer: RecordWriter, monitor: Monitor, res: SessionResult, quiet: bool,
           notes: list[str] | None = None) -> int:
    st = monitor.stats
    extra = {"reports": st.accepted, "unmatched_reports": st.unmatched,
             "outside_reports": st.outside, "late_reports": st.late}
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


def _page_node_sampler(seed):
    import numpy as np

    from udamon.targets.page_nodes import sample_region_nodes

    rng = np.random.default_rng(seed)

    def annotate(snap) -> None:
        snap.page_nodes = sample_region_nodes(snap.pid, snap.start, snap.end, rng)

    return annotate


class _LiveProgress:
    """Elapsed time (and a bar with --duration) on stderr when it is a terminal."""

    def __init__(self, enabled: bool, duration_ns: int | None):
        self._p = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            cols = [TextColumn("recording"), TimeElapsedColumn()]
            if duration_ns:
                cols.insert(1, BarColumn())
            self._p = Progress(*cols, transient=True)
            self._p.start()
            self._task = self._p.add_task("rec", total=(duration_ns or 0) / 1e9 or None)

    def update(self, elapsed_ns: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=elapsed_ns / 1e9)

    def done(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
