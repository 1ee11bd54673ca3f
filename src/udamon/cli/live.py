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
from udamon.core.session import Session, Sink, StopFlag, stderr_log
from udamon.errors import TargetGone, UsageError
from udamon.primitives import registry
from udamon.probes import breakdown as breakdown_mod
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe
from udamon.units import parse_duration_ns

INPUT_FORMATS = ("csv", "perf-script")

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
    physical: bool = False  # --paddr: the physical address space (kernel primitive)


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


def add_session_args(p: argparse.ArgumentParser, *, replay: bool,
                     acts: bool = False) -> None:
    """The target, primitive, filter and monitoring options of a session.  ``acts``: the
    command acts on every interval's snapshots as they come (a scheme): its latency
    defaults to 0."""
    p.epilog = primitives_help(replay) + ("\n\n" + p.epilog if p.epilog else "")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_source_args(p, replay)
    _add_target_args(p, replay, acts)
    _add_output_args(p)
    _add_hint_args(p)
    _add_kernel_args(p)
    add_filter_args(p)
    add_monitoring_args(p)
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND ARGS: launch and monitor a command from its start")


def _add_source_args(p: argparse.ArgumentParser, replay: bool) -> None:
    """Where reports come from: --primitive, and replay's / external's inputs."""
    p.add_argument("--primitive", default="auto", metavar="NAME[,NAME]",
                   type=typed(_primitive_list(replay), "primitive"),
                   help="how accesses are seen: " +
                        ", ".join(registry.names() if replay else
                                  ["auto", *(n for n, e in registry.ENTRIES.items() if e.live)])
                        + "; several live ones at once, e.g. hint,wp (at most one of wp, rwp: "
                        "it drives nr_accesses, the others feed the probes) (default auto: "
                        "external with --socket" +
                        (" or --input -, replay with --input FILE" if replay else "") +
                        ", else the best live primitive this machine has)")
    if replay:
        p.add_argument("--input", metavar="FILE",
                       help="replay input: CSV with header time_ns,pid,tid,cpu,addr,size,write "
                            "(optional columns: node, source, mem, page_node; without node, "
                            "a report's node is its CPU's node on this machine or in "
                            "--cpu-nodes, with a warning when nodes are filtered or broken "
                            "down and no --cpu-nodes is given), or perf script output with "
                            "--input-format perf-script.  '-' reads reports live from stdin "
                            "(--primitive external; CSV lines or binary records, time_ns on "
                            "CLOCK_MONOTONIC or 0 for 'now'; ends at end of input)")
        p.add_argument("--input-format", choices=INPUT_FORMATS, default="csv",
                       help="format of the --input FILE: csv (default) or perf-script "
                            "(the text of 'perf script -F pid,tid,cpu,time,event,addr,...' "
                            "for perf mem samples, the page-faults event recorded with -d "
                            "--sample-cpu, or exceptions:page_fault_user samples; see "
                            "docs/primitives.md)")
        p.add_argument("--cpu-nodes", metavar="CPUS=NODE[,...]",
                       help="replay: the recorded machine's CPU-to-node map, for input "
                            "without a node column (e.g. 0-3=0,4-7=1; join CPU lists with "
                            "'+': 0-1+4-5=0); default: this machine's map")
    p.add_argument("--socket", metavar="PATH",
                   help="--primitive external: listen on this unix socket for reports from "
                        "other programs (created mode 0600 and removed at the end; only this "
                        "user and root may report; wire format in docs/report-channel.md, "
                        "clients: python -m udamon.reporter, udamon_report.h)")


def _latency_arg(text: str) -> int:
    if text.strip().startswith("-"):
        raise ValueError(f"latency cannot be negative, got {text!r}")
    return 0 if text.strip() == "0" else parse_duration_ns(text)


def _add_target_args(p: argparse.ArgumentParser, replay: bool, acts: bool = False) -> None:
    """What is monitored and for how long."""
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
    p.add_argument("--latency", metavar="DUR", type=typed(_latency_arg, "duration"),
                   default=0 if acts else None,
                   help="hint, pmu and external sessions: how late a finished aggregation "
                        "interval may be closed; udamon then closes the due ones together "
                        "and wakes once per latency instead of once per interval (same "
                        "snapshots, less CPU) " + (
                            "(default 0: each interval as it ends, so that actions follow "
                            "the intervals)" if acts else
                            "(default 1s, or the aggregation interval when that is longer; "
                            "0: each interval as it ends).  wp, rwp and kernel sessions close "
                            "each interval when it ends; see docs/primitives.md"))


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """What each snapshot carries beyond nr_accesses, and progress."""
    p.add_argument("--breakdown", metavar="KIND[,KIND]", action="append", default=[],
                   help="add automatic probes: cpu (cpu:<n> per CPU), node (node:<n>), "
                        "thread (thread:<tid> per thread present at start; with -- COMMAND "
                        "that is only its first thread: threads created later are not broken "
                        "down), rw (write, read), numa (local, remote: the accessing CPU's "
                        "node is / is not the node holding the page; needs page nodes, "
                        "see --no-page-nodes), auto (cpu, rw, node with two nodes or more, "
                        "thread, each while its probes stay within 64: the default of a live "
                        "'udamon record', so that a record answers report sharing, numa and "
                        "dirty later), none")
    p.add_argument("--no-page-nodes", action="store_true",
                   help="do not look up which NUMA node holds each reported page (by default "
                        "every report gets its page's node, from batched move_pages(2) "
                        "queries, each page once per aggregation; the local/remote filters, "
                        "--breakdown numa and 'report numa' use it)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _add_hint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "hint scanner (NUMA-balancing scan tunables in /sys/kernel/debug/sched/numa_balancing/; "
        "applied where writable, else noted in the record)")
    g.add_argument("--hint-scan-period", metavar="DUR", type=typed(_scan_period_ms, "duration"),
                   help="scan period of every task (scan_period_min_ms = max_ms = delay_ms); "
                        "default ~100 sampling intervals, within 100ms..1s (10ms..1h)")
    g.add_argument("--hint-scan-size", metavar="MIB", type=typed(_scan_size_mb, "MiB"),
                   help="MiB of a task's memory hinted per scan step (scan_size_mb; "
                        "default 256, 1..1048576)")


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    k = p.add_argument_group("kernel DAMON (--primitive kernel; docs/kernel-damon.md)")
    k.add_argument("--paddr", action="store_true",
                   help="monitor the physical address space (DAMON paddr) instead of a "
                        "process: over the --range physical ranges, or all System RAM")
    k.add_argument("--kernel-reader", choices=("auto", "tracepoint", "tried-regions"),
                   default="auto",
                   help="how the kernel's aggregations are read: its damon:damon_aggregated "
                        "tracepoints (exact; auto's choice where they can be read) or its "
                        "stat scheme's tried_regions (misses aggregations while it reads)")


def _primitive_list(replay: bool):
    allowed = registry.names() if replay else [
        "auto", *(n for n, e in registry.ENTRIES.items() if e.live)]

    def parse(text: str) -> str:
        names = [n.strip() for n in text.split(",")]
        bad = [n for n in names if n not in allowed]
        if bad or not all(names):
            raise ValueError(f"invalid choice: {', '.join(bad) or text!r} "
                             f"(choose from {', '.join(allowed)})")
        if len(names) > 1 and ("auto" in names or "replay" in names):
            raise ValueError("auto and replay run alone")
        return ",".join(names)
    return parse


def machine_cpus() -> list[int]:
    """The CPUs this machine has (present, online or not)."""
    from udamon.system.perf_tracepoint import online_cpus
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
    from udamon.system.sysctl_guard import SCAN_PERIOD_MS_RANGE
    from udamon.units import parse_duration_us

    us = parse_duration_us(text)
    lo, hi = SCAN_PERIOD_MS_RANGE
    if not lo * 1000 <= us <= hi * 1000 or us % 1000:
        raise ValueError(f"the scan period must be whole milliseconds within {lo}ms..{hi // 1000}s"
                         f", got {text!r}")
    return us // 1000


def _scan_size_mb(text: str) -> int:
    from udamon.system.sysctl_guard import SCAN_SIZE_MB_RANGE

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
    if getattr(a, "input", None) in (None, "-"):  # live targets (replay pids are the input's)
        check_pids(pids)
    names = a.primitive.split(",")
    _check_cpu_nodes(getattr(a, "cpu_nodes", None), names, getattr(a, "input", None))
    if len(names) > 1:
        return _resolve_several(a, names, filters, probes, kinds, ranges, pids, command)
    prim = _choose_primitive(a)
    _check_source_options(a, prim, command)
    e = registry.entry(prim)
    options = _primitive_options(a, prim)
    if e.live:
        check_cpus([*filters, *(f for p in probes for f in p.filters)])
    attrs = attrs_from_args(a, e.default_sample_us, e.default_aggr_us)
    physical = bool(getattr(a, "paddr", False))
    if physical:
        ranges = _physical_ranges(ranges, pids, command)
    return SessionSpec(prim, attrs, filters, probes, kinds, ranges, pids, command,
                       {prim: options} if options else {}, physical=physical)


def _physical_ranges(ranges, pids, command) -> list[tuple[int, int]]:
    """--paddr: the --range ranges are physical; without them, all System RAM."""
    if pids or command:
        raise UsageError("--paddr monitors the physical address space: give no --pid and no "
                         "command")
    if ranges is not None:
        return ranges
    from udamon.system.kernel_sysfs import system_ram

    ram = system_ram()
    if not ram:
        raise UsageError("/proc/iomem lists no System RAM: give --range START-END")
    return ram


def _choose_primitive(a: argparse.Namespace) -> str:
    """--primitive auto: external for --socket / --input -, replay for --input FILE,
    else the best live primitive this machine has (and the user hears why)."""
    inp = getattr(a, "input", None)
    if a.primitive != "auto":
        return a.primitive
    if inp == "-" or a.socket:
        return "external"
    if inp:
        return "replay"
    prim, why = registry.choose_live()
    if not getattr(a, "quiet", False):
        print(f"udamon: {why}", file=sys.stderr)
    return prim


def _check_source_options(a: argparse.Namespace, prim: str, command: list[str]) -> None:
    """--input, --input-format and --socket each belong to one primitive."""
    inp = getattr(a, "input", None)
    fmt = getattr(a, "input_format", "csv")
    live_input = inp == "-"
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


def _primitive_options(a: argparse.Namespace, prim: str) -> dict:
    """The primitive's own options: hint's scan tunables, external's channels."""
    options = {k: v for k, v in (("scan_period_ms", a.hint_scan_period),
                                 ("scan_size_mb", a.hint_scan_size)) if v is not None}
    if options and prim != "hint":
        raise UsageError(f"--hint-scan-period/--hint-scan-size are for --primitive hint, "
                         f"not {prim}")
    if prim == "external":
        options = {"socket_path": a.socket, "stdin": getattr(a, "input", None) == "-"}
    paddr, reader = getattr(a, "paddr", False), getattr(a, "kernel_reader", "auto")
    if prim == "kernel":
        options = {"reader": reader}
    elif paddr or reader != "auto":
        raise UsageError(f"--paddr and --kernel-reader are for --primitive kernel, not {prim}")
    return options


def _check_cpu_nodes(text: str | None, names: list[str], inp: str | None) -> None:
    """--cpu-nodes is the recorded machine's map: for replay only, and well formed."""
    if text is None:
        return
    if names not in (["replay"], ["auto"]) or not inp or inp == "-":
        raise UsageError("--cpu-nodes maps a replayed input's CPUs to nodes (--input FILE); "
                         "live reports come from this machine, whose map udamon reads itself")
    from udamon.targets.topology import parse_cpu_nodes

    try:
        parse_cpu_nodes(text)
    except ValueError as e:
        raise UsageError(f"--cpu-nodes {text}: {e}") from None


def _resolve_several(a, names, filters, probes, kinds, ranges, pids, command) -> SessionSpec:
    """--primitive hint,wp: live primitives only, their own options where given."""
    if getattr(a, "input", None) or a.socket:
        raise UsageError("--input and --socket take one primitive (replay or external)")
    options = {k: v for k, v in (("scan_period_ms", a.hint_scan_period),
                                 ("scan_size_mb", a.hint_scan_size)) if v is not None}
    if options and "hint" not in names:
        raise UsageError("--hint-scan-period/--hint-scan-size are for --primitive hint")
    check_cpus([*filters, *(f for p in probes for f in p.filters)])
    lead = registry.entry(next((n for n in names if n in ("wp", "rwp")), names[0]))
    attrs = attrs_from_args(a, lead.default_sample_us, lead.default_aggr_us)
    return SessionSpec(",".join(names), attrs, filters, probes, kinds, ranges, pids, command,
                       {"hint": options} if options else {})


def run_session(a, spec: SessionSpec, sinks: list[Sink], *, progress: bool = True) -> int:
    """Run a live session of the command line's ``spec`` into ``sinks``: a ``Session``
    with the command line's extras (progress bar, signals, a launched command waited for,
    notes on stderr).  Returns the exit status."""
    if not spec.physical and bool(spec.pids) == bool(spec.command):
        raise UsageError("give the target: --pid PID or -- COMMAND ARGS (one of them)"
                         + (" (or --paddr)" if spec.primitive == "kernel" else ""))
    if spec.command and "thread" in spec.kinds:
        print("udamon: note: --breakdown thread with -- COMMAND covers the command's first "
              "thread only: threads it creates later are not broken down", file=sys.stderr)
    bar = LiveProgress(progress and not a.quiet and sys.stderr.isatty(), a.duration)
    session = Session(pids=spec.pids, command=spec.command, primitive=spec.primitive,
                      attrs=spec.attrs, filters=spec.filters, probes=spec.probes,
                      breakdown=spec.kinds, ranges=spec.ranges, duration_ns=a.duration,
                      seed=a.seed, page_nodes=not a.no_page_nodes,
                      regions_follow_origin=getattr(a, "regions_follow_origin", None),
                      probe_weights=probe_weights(a), options=spec.options,
                      physical=spec.physical, latency_ns=getattr(a, "latency", None),
                      stop=install_stop(), log=stderr_log, on_tick=bar.update)
    try:
        session.run(sinks)
    except TargetGone as e:
        if not session.header:  # before monitoring began: the pid given is wrong
            raise UsageError(str(e)) from None
        raise
    finally:
        bar.done()
    for w in session.warnings:
        print(f"udamon: note: {w}", file=sys.stderr)
    launched = session.launched
    if launched and launched.poll() is None:
        if not a.quiet:
            print(f"udamon: monitoring done; waiting for {spec.command[0]} (pid "
                  f"{launched.pid}) to exit (Ctrl-C passes on to it)", file=sys.stderr)
        launched.wait_forwarding_signals()
    if launched and not a.quiet:
        print(f"udamon: {spec.command[0]} exited with status {launched.returncode}",
              file=sys.stderr)
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
