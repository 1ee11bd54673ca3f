"""A live monitoring session shared by ``record``, ``monitor`` and ``exporter``:
resolve the targets (pids or a launched command), start the primitive, build
the monitor (with breakdown probes), run in real time, and hand snapshots to
sinks.  Every path stops the primitive (which restores system settings) and
never harms the target: a launched command is waited for, not killed."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass, field
from typing import Protocol

from udamon.cli.common import (
    add_filter_args,
    add_monitoring_args,
    attrs_from_args,
    duration_arg,
    filters_from_args,
    parse_ranges,
    pid_list,
    probe_weights,
    probes_from_args,
    typed,
    weigh_probes,
)
from udamon.core.attrs import Attrs
from udamon.core.monitor import Monitor, Snapshot
from udamon.core.session import SessionResult, StopFlag, run_live
from udamon.errors import RuntimeFailure, TargetGone, UsageError
from udamon.primitives import registry
from udamon.probes import breakdown as breakdown_mod
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe
from udamon.targets.page_nodes import PageNodeLookup

INPUT_FORMATS = ("csv", "perf-script")

class Sink(Protocol):
    def begin(self, header: dict, monitor: Monitor) -> None: ...
    def snapshot(self, snap: Snapshot) -> None: ...
    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None: ...
    def fail(self, error: str) -> None: ...


def install_stop() -> StopFlag:
    stop = StopFlag()

    def handler(signum, frame):
        stop.set("interrupted")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def add_breakdown(probes: list[Probe], kinds: list[str], a=None, **who) -> list[Probe]:
    """The --probe probes plus the --breakdown ones, weighted by --probe-weight and
    --regions-follow-origin (``a``: the parsed options)."""
    follow = getattr(a, "regions_follow_origin", None)
    if follow is None:
        follow = any(k in breakdown_mod.ORIGIN_KINDS for k in kinds)
    try:
        extra = breakdown_mod.breakdown_probes(kinds, follow_origin=follow, **who)
    except ValueError as e:
        raise UsageError(str(e)) from None
    clash = {p.name for p in probes} & {p.name for p in extra}
    if clash:
        raise UsageError(f"--probe names clash with --breakdown probes: {', '.join(sorted(clash))}")
    return weigh_probes(probes + extra, probe_weights(a) if a is not None else {})


@dataclass
class SessionSpec:
    primitive: str
    attrs: Attrs
    filters: list[Filter]
    probes: list[Probe]
    kinds: list[str]  # --breakdown
    ranges: list[tuple[int, int]] | None
    pids: list[int]
    command: list[str]
    options: dict = field(default_factory=dict)  # the primitive's own (hint's scan tunables)


def primitives_help(replay: bool) -> str:
    """The epilog paragraph that lists the primitives and what each changes."""
    from udamon.primitives.hint import SYSTEM_CHANGES

    lines = ["primitives:"]
    for e in registry.ENTRIES.values():
        if e.live or replay:
            lines.append(f"  {e.name:<8} {e.help}")
    lines.append("\nSystem-wide changes: with --primitive hint, " + SYSTEM_CHANGES + ".")
    from udamon.cli.guide import GUIDE_HELP

    lines.append("\n" + GUIDE_HELP)
    return "\n".join(lines)


def add_session_args(p: argparse.ArgumentParser, *, replay: bool) -> None:
    """The target, primitive, filter and monitoring options of a session."""
    p.epilog = primitives_help(replay) + ("\n\n" + p.epilog if p.epilog else "")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--primitive", default="auto",
                   choices=registry.names() if replay else
                   ["auto", *(n for n, e in registry.ENTRIES.items() if e.live)],
                   help="how accesses are seen (default auto: external with --socket" +
                        (" or --input -, replay with --input FILE" if replay else "") +
                        ", else the best live primitive this machine has)")
    if replay:
        p.add_argument("--input", metavar="FILE",
                       help="replay input: CSV with header time_ns,pid,tid,cpu,addr,size,write "
                            "(optional columns: node, source, mem, page_node; without node, "
                            "a report's "
                            "node is its CPU's node on this machine, with a warning when nodes "
                            "are filtered or broken down), or perf script output with "
                            "--input-format perf-script.  '-' reads reports live from stdin "
                            "(--primitive external; CSV lines or binary records, time_ns on "
                            "CLOCK_MONOTONIC or 0 for 'now'; ends at end of input)")
        p.add_argument("--input-format", choices=INPUT_FORMATS, default="csv",
                       help="format of the --input FILE: csv (default) or perf-script "
                            "(the text of 'perf script -F pid,tid,cpu,time,event,addr,...' "
                            "for perf mem samples, the page-faults event recorded with -d "
                            "--sample-cpu, or exceptions:page_fault_user samples; see "
                            "docs/primitives.md)")
    p.add_argument("--socket", metavar="PATH",
                   help="--primitive external: listen on this unix socket for reports from "
                        "other programs (created mode 0600 and removed at the end; only this "
                        "user and root may report; wire format in docs/report-channel.md, "
                        "clients: python -m udamon.reporter, udamon_report.h)")
    p.add_argument("--pid", metavar="PID[,PID...]", action="append", default=[],
                   type=typed(pid_list, "pid list"),
                   help="target process(es)" + ("; with --input, which pids of the input to "
                                               "monitor (default: all)" if replay else ""))
    p.add_argument("--range", metavar="START-END", action="append", default=[],
                   help="monitor this address range (repeatable; decimal or 0x-hex) instead of "
                        "the process's mappings" +
                        (" or, for replay, the ranges the reports touch" if replay else ""))
    p.add_argument("--duration", metavar="DUR", type=typed(duration_arg, "duration"),
                   help="stop after this long (default: until the targets exit or Ctrl-C)")
    p.add_argument("--breakdown", metavar="KIND[,KIND]", action="append", default=[],
                   help="add automatic probes: cpu (cpu:<n> per CPU), node (node:<n>), "
                        "thread (thread:<tid> per thread present at start; with -- COMMAND "
                        "that is only its first thread: threads created later are not broken "
                        "down), rw (write, read), numa (local, remote: the accessing CPU's "
                        "node is / is not the node holding the page; needs page nodes, "
                        "see --no-page-nodes)")
    p.add_argument("--no-page-nodes", action="store_true",
                   help="do not look up which NUMA node holds each reported page (by default "
                        "every report gets its page's node, from batched move_pages(2) "
                        "queries, each page once per aggregation; the local/remote filters, "
                        "--breakdown numa and 'report numa' use it)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    g = p.add_argument_group(
        "hint scanner (NUMA-balancing scan tunables in /sys/kernel/debug/sched/numa_balancing/; "
        "applied where writable, else noted in the record)")
    g.add_argument("--hint-scan-period", metavar="DUR", type=typed(_scan_period_ms, "duration"),
                   help="scan period of every task (scan_period_min_ms = max_ms = delay_ms); "
                        "default ~100 sampling intervals, within 100ms..1s (10ms..1h)")
    g.add_argument("--hint-scan-size", metavar="MIB", type=typed(_scan_size_mb, "MiB"),
                   help="MiB of a task's memory hinted per scan step (scan_size_mb; "
                        "default 256, 1..1048576)")
    add_filter_args(p)
    add_monitoring_args(p)
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND ARGS: launch and monitor a command from its start")


def machine_cpus() -> list[int]:
    """The CPUs this machine has (present, online or not)."""
    from udamon.primitives.perf_tracepoint import online_cpus
    from udamon.targets.topology import parse_cpulist

    try:
        with open("/sys/devices/system/cpu/present") as f:
            return parse_cpulist(f.read()) or online_cpus()
    except (OSError, ValueError):
        return online_cpus()


def _cpulist(cpus: list[int]) -> str:
    """Sorted [0, 1, 2, 5] -> "0-2,5" (the kernel's list format)."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def check_cpus(filters: list[Filter]) -> None:
    """Live sessions: a CPU this machine does not have can never report, so naming one
    is a mistake (a typo, another machine's list), not a filter that matches nothing.
    Replay input comes from anywhere and keeps any CPU."""
    from udamon.targets.topology import parse_cpulist

    have = set(machine_cpus())
    bad = sorted({c for f in filters if f.type == "cpus"  # ids are '+'-separated in FILTERS
                  for c in parse_cpulist((f.value or "").replace("+", ","))} - have)
    if bad:
        raise UsageError(f"no CPU {_cpulist(bad)} on this machine "
                         f"(its CPUs: {_cpulist(sorted(have))})")


def check_pids(pids: list[int]) -> None:
    """Live targets must be user processes: a kernel thread has no user memory, and
    each primitive would fail on it in its own way (a ptrace refusal, "does not
    exist"); say what it is, before anything starts."""
    from udamon.targets.procmaps import kernel_thread_name

    for pid in pids:
        name = kernel_thread_name(pid)
        if name is not None:
            raise UsageError(f"process {pid} ({name}) is a kernel thread: it has no user "
                             "memory to monitor")


def _scan_period_ms(text: str) -> int:
    from udamon.primitives.sysctl_guard import SCAN_PERIOD_MS_RANGE
    from udamon.units import parse_duration_us

    us = parse_duration_us(text)
    lo, hi = SCAN_PERIOD_MS_RANGE
    if not lo * 1000 <= us <= hi * 1000 or us % 1000:
        raise ValueError(f"the scan period must be whole milliseconds within {lo}ms..{hi // 1000}s"
                         f", got {text!r}")
    return us // 1000


def _scan_size_mb(text: str) -> int:
    from udamon.primitives.sysctl_guard import SCAN_SIZE_MB_RANGE

    lo, hi = SCAN_SIZE_MB_RANGE
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number of MiB, got {text!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"the scan size must be within {lo}..{hi} MiB, got {v}")
    return v


def resolve(a: argparse.Namespace, *, replay: bool) -> SessionSpec:
    """Validate the session options into a spec (UsageError on bad input)."""
    filters = filters_from_args(a)
    probes = probes_from_args(a)
    try:
        kinds = breakdown_mod.parse_kinds(a.breakdown)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ranges = parse_ranges(a.range)
    pids = [p for group in a.pid for p in group]
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    inp = getattr(a, "input", None)
    fmt = getattr(a, "input_format", "csv")
    live_input = inp == "-"
    if not inp or live_input:  # live targets (replay pids are the input's)
        check_pids(pids)
    prim = a.primitive
    if prim == "auto" and (live_input or a.socket):
        prim = "external"
    elif prim == "auto" and inp:
        prim = "replay"
    elif prim == "auto":
        prim, why = registry.choose_live()
        if not getattr(a, "quiet", False):
            print(f"udamon: {why}", file=sys.stderr)
    if prim == "replay":
        if not inp:
            raise UsageError("--primitive replay needs --input FILE")
        if live_input:
            raise UsageError("--input - reads live reports: it is for --primitive external, "
                             "not replay (give a file to replay)")
        if command:
            raise UsageError("replay reads recorded reports; it cannot launch a command")
    elif inp and not (live_input and prim == "external"):
        raise UsageError(f"--input is for the replay primitive, not {prim}"
                         + (" (--input - feeds --primitive external)" if live_input else ""))
    if fmt != "csv" and (prim != "replay"):
        raise UsageError(f"--input-format {fmt} is for replaying a file (--input FILE)")
    if prim == "external" and not (a.socket or live_input):
        raise UsageError("--primitive external needs --socket PATH (reports from other "
                         "programs) and/or --input - (reports on stdin)")
    if a.socket and prim != "external":
        raise UsageError(f"--socket is for --primitive external, not {prim}")
    e = registry.entry(prim)
    options = {k: v for k, v in (("scan_period_ms", a.hint_scan_period),
                                 ("scan_size_mb", a.hint_scan_size)) if v is not None}
    if options and prim != "hint":
        raise UsageError(f"--hint-scan-period/--hint-scan-size are for --primitive hint, "
                         f"not {prim}")
    if prim == "external":
        options = {"socket_path": a.socket, "stdin": live_input}
    if e.live:
        check_cpus([*filters, *(f for p in probes for f in p.filters)])
    attrs = attrs_from_args(a, e.default_sample_us, e.default_aggr_us)
    return SessionSpec(prim, attrs, filters, probes, kinds, ranges, pids, command, options)


def run_session(a, spec: SessionSpec, sinks: list[Sink], *, progress: bool = True) -> int:
    from udamon.primitives.perf_tracepoint import online_cpus
    from udamon.record.writer import build_header
    from udamon.targets.launch import Launched
    from udamon.targets.procmaps import read_vmas, thread_ids
    from udamon.targets.topology import cpu_to_node

    prim_name, attrs, filters, probes = spec.primitive, spec.attrs, spec.filters, spec.probes
    kinds, ranges, pids, command = spec.kinds, spec.ranges, spec.pids, spec.command
    if bool(pids) == bool(command):
        raise UsageError("give the target: --pid PID or -- COMMAND ARGS (one of them)")
    entry = registry.entry(prim_name)
    # privileges first: a user who may not use the primitive at all must hear that,
    # not that some /proc file of a process they do not own cannot be read
    primitive = registry.make_live(prim_name, attrs, **spec.options)
    if command and "thread" in kinds:
        print("udamon: note: --breakdown thread with -- COMMAND covers the command's first "
              "thread only: threads it creates later are not broken down", file=sys.stderr)
    for pid in pids:
        try:
            read_vmas(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
    stop = install_stop()
    launched = Launched(command) if command else None
    targets = [launched.pid] if launched else pids
    begun: list[Sink] = []
    released = launched is None
    try:
        if launched and entry.attach_before_exec:
            primitive.start(targets)
            launched.release()
            released = True
        else:
            if launched:
                launched.release()
                released = True
            primitive.start(targets)
        if kinds:
            cpus = online_cpus()
            table = cpu_to_node()
            nodes = {int(table[c]) for c in cpus if c < table.size and table[c] >= 0}
            tids: set[int] = set()
            for pid in targets:
                try:
                    tids.update(thread_ids(pid))
                except TargetGone:
                    pass
            probes = add_breakdown(probes, kinds, a, cpus=cpus, nodes=nodes, tids=tids)
        else:
            probes = add_breakdown(probes, [], a)
        monitor = Monitor(attrs, filters, probes, seed=a.seed,
                          count_written_pages=primitive.kind != "controlled")
        gone = primitive.gone_at_start()
        for pid in targets:
            if pid in gone:
                continue
            try:
                # a launched command's name is what it exec'd (read before the exec
                # finished, /proc/PID/comm can still say udamon's)
                monitor.add_target(pid, ranges, name=launched.comm if launched else None)
            except TargetGone:
                gone.append(pid)
        if not monitor.targets:
            raise RuntimeFailure(
                f"{command[0]} (pid {gone[0]}) exited before monitoring started" if launched else
                f"process {gone[0]} does not exist" if len(gone) == 1 else
                f"processes {', '.join(map(str, gone))} exited before monitoring started")
        gone_notes = [f"process {pid} exited before monitoring started; monitoring the others"
                      for pid in gone]
        for n in gone_notes:
            print(f"udamon: note: {n}", file=sys.stderr)
        extra = {"command": command} if command else {}
        start_notes = primitive.stats().notes + gone_notes
        header = build_header(attrs, prim_name, primitive.coverage, filters, probes,
                              monitor.targets, clock="monotonic", notes=start_notes,
                              written_pages=monitor.count_written_pages, **extra)
        for s in sinks:
            s.begin(header, monitor)
            begun.append(s)

        def sink(snap: Snapshot) -> None:
            for s in sinks:
                s.snapshot(snap)

        bar = LiveProgress(progress and not a.quiet and sys.stderr.isatty(), a.duration)
        try:
            lookup = None if a.no_page_nodes else PageNodeLookup()
            res = run_live(monitor, primitive, sink, duration_ns=a.duration, stop=stop,
                           on_tick=bar.update, page_nodes=lookup)
        finally:
            bar.done()
        st = primitive.stats()
        notes = [n for n in st.notes if n not in start_notes]
        if lookup is not None and lookup.stats.reports:
            notes.append(lookup.stats.note())
        for s in sinks:
            s.end(res, monitor, notes)
        for w in st.warnings:
            print(f"udamon: note: {w}", file=sys.stderr)
    except BaseException as e:
        primitive.stop()  # idempotent; restores system settings
        for s in begun:
            s.fail(str(e) or type(e).__name__)
        if not released:
            launched.release()
        raise
    if launched and launched.poll() is None:
        if not a.quiet:
            print(f"udamon: monitoring done; waiting for {command[0]} (pid {launched.pid}) "
                  "to exit (Ctrl-C passes on to it)", file=sys.stderr)
        launched.wait_forwarding_signals()
    if launched and not a.quiet:
        print(f"udamon: {command[0]} exited with status {launched.returncode}", file=sys.stderr)
    return 0


class LiveProgress:
    """Elapsed time (and a bar with --duration) on stderr when it is a terminal."""

    def __init__(self, enabled: bool, duration_ns: int | None):
        self._p = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            cols = [TextColumn("monitoring"), TimeElapsedColumn()]
            if duration_ns:
                cols.insert(1, BarColumn())
            self._p = Progress(*cols, transient=True)
            self._p.start()
            self._task = self._p.add_task("mon", total=(duration_ns or 0) / 1e9 or None)

    def update(self, elapsed_ns: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=elapsed_ns / 1e9)

    def done(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
