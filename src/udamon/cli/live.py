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

import numpy as np

from udamon.cli.common import (
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
from udamon.core.attrs import Attrs
from udamon.core.monitor import Monitor, Snapshot
from udamon.core.session import SessionResult, StopFlag, run_live
from udamon.errors import RuntimeFailure, TargetGone, UsageError
from udamon.primitives import registry
from udamon.probes import breakdown as breakdown_mod
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe

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


def add_breakdown(probes: list[Probe], kinds: list[str], **who) -> list[Probe]:
    try:
        extra = breakdown_mod.breakdown_probes(kinds, **who)
    except ValueError as e:
        raise UsageError(str(e)) from None
    clash = {p.name for p in probes} & {p.name for p in extra}
    if clash:
        raise UsageError(f"--probe names clash with --breakdown probes: {', '.join(sorted(clash))}")
    return probes + extra


def page_node_sampler(seed):
    from udamon.targets.page_nodes import sample_region_nodes

    rng = np.random.default_rng(seed)

    def annotate(snap: Snapshot) -> None:
        # an interval without reports has no access to place, and hint's are mostly
        # quiet: skipping them saves a move_pages() pass per aggregation (~1 ms)
        if snap.nr_reports:
            snap.page_nodes = sample_region_nodes(snap.pid, snap.start, snap.end, rng)

    return annotate


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
    paddr: bool = False  # --paddr: the physical address space (kernel primitive)


def primitives_help(replay: bool) -> str:
    """The epilog paragraph that lists the primitives and what each changes."""
    from udamon.primitives.hint import SYSTEM_CHANGES

    lines = ["primitives:"]
    for e in registry.ENTRIES.values():
        if e.live or replay:
            lines.append(f"  {e.name:<8} {e.help}")
    lines.append("\nSystem-wide changes: with --primitive hint, " + SYSTEM_CHANGES + ".")
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
                            "(optional columns: node, source, mem; without node, a report's "
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
                        "down), rw (write, read)")
    p.add_argument("--no-page-nodes", action="store_true",
                   help="do not sample which NUMA node holds each region's pages (by default "
                        "2 random pages per region per aggregation that had reports, with "
                        "move_pages(2) in query mode; 'report numa' uses them)")
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
    k = p.add_argument_group("kernel DAMON (--primitive kernel; docs/kernel-damon.md)")
    k.add_argument("--paddr", action="store_true",
                   help="monitor the physical address space (DAMON paddr) instead of a "
                        "process: over the --range physical ranges, or all System RAM")
    k.add_argument("--kernel-weight", metavar="PROBE=W", action="append", default=[],
                   help="the kernel probe PROBE's weight (Linux 7.3 attributes-only "
                        "monitoring: regions follow the weighted probe hits, nr_accesses "
                        "stay 0)")
    k.add_argument("--kernel-reader", choices=("auto", "tracepoint", "tried-regions"),
                   default="auto",
                   help="how aggregations are read: the damon:damon_aggregated tracepoints "
                        "(exact; auto's choice where they can be read) or the stat scheme's "
                        "tried_regions (misses aggregations while it reads)")
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
    paddr = bool(getattr(a, "paddr", False))
    if prim == "kernel":
        options = _kernel_options(a, filters, probes, kinds, ranges, pids, command)
    else:
        _no_kernel_options(a, prim, filters, probes)
    if e.live:
        check_cpus([*filters, *(f for p in probes for f in p.filters)])
    attrs = attrs_from_args(a, e.default_sample_us, e.default_aggr_us)
    if paddr and ranges is None:
        ranges = options["ranges"]
    return SessionSpec(prim, attrs, filters, probes, kinds, ranges, pids, command, options,
                       paddr=paddr)


def _kernel_options(a, filters, probes, kinds, ranges, pids, command) -> dict:
    """--primitive kernel: what the kernel's DAMON can be asked for, or one line why not."""
    from udamon.primitives.kernel_sysfs import KernelProbe, check_probe_filters, system_ram

    if filters:
        raise UsageError("the kernel's DAMON has no sample filters (per-CPU, thread and "
                         "read/write sample filters are not upstream): --cpus, --tids, "
                         "--write-only and --filter cannot be used with --primitive kernel")
    if kinds:
        raise UsageError(f"--breakdown {','.join(kinds)}: the kernel's DAMON cannot tell which "
                         "CPU, node or thread made an access, nor read from write; use a "
                         "primitive that reports them (hint, rwp)")
    weights: dict[str, int] = {}
    names = {p.name for p in probes}
    for spec in a.kernel_weight:
        name, sep, w = spec.partition("=")
        try:
            weight = int(w)
        except ValueError:
            weight = -1
        if not sep or weight < 0:
            raise UsageError(f"bad --kernel-weight {spec!r} (expected PROBE=W, W a whole "
                             "number >= 0)")
        if name not in names:
            raise UsageError(f"--kernel-weight {spec!r}: no --probe named {name!r}")
        weights[name] = weight
    kprobes = [KernelProbe(p.name, p.filters, weights.get(p.name, 0)) for p in probes]
    check_probe_filters(kprobes)
    if a.paddr:
        if pids or command:
            raise UsageError("--paddr monitors the physical address space: give no --pid "
                             "and no command")
        if ranges is None:
            ranges = system_ram()
            if not ranges:
                raise UsageError("/proc/iomem lists no System RAM: give --range START-END")
    elif not pids and not command:
        raise UsageError("give the target: --pid PID or -- COMMAND ARGS (or --paddr)")
    return {"paddr": bool(a.paddr), "ranges": ranges, "probes": kprobes,
            "reader": a.kernel_reader}


def _no_kernel_options(a, prim: str, filters, probes) -> None:
    """Options and filter types only the kernel primitive takes."""
    from udamon.probes.filters import KERNEL_ONLY_TYPES

    if getattr(a, "paddr", False) or getattr(a, "kernel_weight", None) or \
            getattr(a, "kernel_reader", "auto") != "auto":
        raise UsageError(f"--paddr, --kernel-weight and --kernel-reader are for --primitive "
                         f"kernel, not {prim}")
    for f in [*filters, *(f for p in probes for f in p.filters)]:
        if f.type in KERNEL_ONLY_TYPES:
            raise UsageError(f"filter type {f.type!r} is evaluated by the kernel's DAMON only "
                             f"(--primitive kernel probes); reports from {prim} do not say "
                             "what backs a page")


def run_session(a, spec: SessionSpec, sinks: list[Sink], *, progress: bool = True) -> int:
    from udamon.primitives.perf_tracepoint import online_cpus
    from udamon.record.writer import build_header
    from udamon.targets.launch import Launched
    from udamon.targets.procmaps import read_vmas, thread_ids
    from udamon.targets.topology import cpu_to_node

    prim_name, attrs, filters, probes = spec.primitive, spec.attrs, spec.filters, spec.probes
    kinds, ranges, pids, command = spec.kinds, spec.ranges, spec.pids, spec.command
    if spec.paddr:
        pids = [0]  # the physical address space: one target, id 0
    if bool(pids) == bool(command):
        raise UsageError("give the target: --pid PID or -- COMMAND ARGS (one of them)")
    entry = registry.entry(prim_name)
    # privileges first: a user who may not use the primitive at all must hear that,
    # not that some /proc file of a process they do not own cannot be read
    primitive = registry.make_live(prim_name, attrs, **spec.options)
    if command and "thread" in kinds:
        print("udamon: note: --breakdown thread with -- COMMAND covers the command's first "
              "thread only: threads it creates later are not broken down", file=sys.stderr)
    for pid in pids if not spec.paddr else []:
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
            probes = add_breakdown(probes, kinds, cpus=cpus, nodes=nodes, tids=tids)
        # a regions primitive (kernel) counts its probes itself; the monitor counts the rest
        mine = [p for p in probes if primitive.kind != "regions"]
        monitor = Monitor(attrs, filters, mine, seed=a.seed,
                          count_written_pages=primitive.kind == "observational")
        gone = primitive.gone_at_start()
        for pid in targets:
            if pid in gone:
                continue
            try:
                monitor.add_target(pid, ranges, **({"name": "paddr"} if spec.paddr else {}))
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
        st0 = primitive.stats()
        extra.update(st0.header)
        start_notes = st0.notes + gone_notes
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
            res = run_live(monitor, primitive, sink, duration_ns=a.duration, stop=stop,
                           on_tick=bar.update,
                           annotate=None if a.no_page_nodes else page_node_sampler(a.seed))
        finally:
            bar.done()
        st = primitive.stats()
        notes = [n for n in st.notes if n not in start_notes]
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
