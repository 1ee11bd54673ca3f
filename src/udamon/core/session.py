"""``udamon.Session``: a whole monitoring session, live or replayed, as a library object.

A session is targets (pids or a command it launches), one or several primitives,
sample filters, probes (and ``breakdown`` kinds that add probes), the monitor, and
whatever consumes the snapshots.  The CLI only turns its options into these
arguments; Python users get the same thing::

    import udamon
    with udamon.Session(pids=[1234], primitive="hint", breakdown=["cpu", "rw"],
                        duration_ns=10_000_000_000) as s:
        for snap in s:
            print(snap.pid, snap.nr_accesses.sum())
    print(s.result.reason)

or ``Session(...).run([sink, ...])`` with sinks that have ``begin(header,
monitor)``, ``snapshot(snap)``, ``end(result, monitor, notes)`` and
``fail(error)`` (udamon.record.writer.RecordSink writes a record file).

Several primitives in one session (``primitive="hint,wp"``): at most one
controlled primitive (wp, rwp), which drives the sampling turns, and any number
of observational ones, whose reports are taken between the turns.  Every report
names its source; when a controlled primitive shares the session, the sample
filters get ``source:<it>`` first, so that ``nr_accesses`` keeps its DAMON meaning
(one sampled page per region per interval) while the others feed the probes
(give a ``source`` filter yourself to choose otherwise).

The kernel's own DAMON (``primitive="kernel"``, kind ``regions``) runs a whole
monitor of its own: its regions, ``nr_accesses`` and ages become the session's,
the probes it can evaluate (``anon``, ``memcg``) are its own, and ``physical=True``
monitors the physical address space over ``ranges`` (one target, id 0).  It runs
alone for now (with hint or rwp it would supply the regions they report over;
docs/kernel-damon.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Protocol

from udamon.core.attrs import Attrs
from udamon.core.loop import (  # noqa: F401 - the session's API
    SessionResult,
    StopFlag,
    iter_live,
    iter_replay,
    run_live,
    run_replay,
)
from udamon.core.monitor import Monitor, Snapshot
from udamon.core.names import NameTracker
from udamon.errors import RuntimeFailure, TargetGone, UsageError
from udamon.primitives import registry
from udamon.primitives.base import Primitive
from udamon.probes import breakdown as breakdown_mod
from udamon.probes.filters import Filter, parse_conditions
from udamon.probes.probe import Probe

# How late an observational session hands over a finished interval by default: it
# wakes once a second instead of ten times (an idle hint session's cost is its wake-ups,
# bench/analysis.md); a record or a live view a second behind loses nothing.
DEFAULT_LATENCY_NS = 1_000_000_000


class Sink(Protocol):
    """What consumes a session's snapshots (record file, live view, exporter, scheme)."""

    def begin(self, header: dict, monitor: Monitor) -> None: ...
    def snapshot(self, snap: Snapshot) -> None: ...
    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None: ...
    def fail(self, error: str) -> None: ...


def describe(attrs: Attrs, primitive: str, coverage: str, filters: Sequence[Filter],
             probes: Sequence[Probe], targets: Sequence, **extra) -> dict:
    """What a session says of itself: the record's header without the format's name and
    version (the record writer adds those), and what live sinks show."""
    import datetime

    from udamon import __version__

    h = {"attrs": attrs.to_dict(), "primitive": primitive, "coverage": coverage,
         "filters": [f.to_dict() for f in filters], "probes": [p.to_dict() for p in probes],
         "targets": [t.to_dict() for t in targets], "udamon_version": __version__,
         "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    h.update(extra)
    return h


def split_primitives(spec: str | Sequence[str]) -> list[str]:
    """``"hint,wp"`` or ``["hint", "wp"]`` -> ``["hint", "wp"]`` (order kept, no repeats)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if not n:
            raise UsageError(f"empty primitive name in {spec!r}")
        if n not in out:
            out.append(n)
    return out


class Session:
    """One monitoring session; see the module docstring.  Errors are typed as the rest
    of udamon's (UsageError for bad arguments, RuntimeFailure when the machine cannot do
    it, InputError for bad replay input); their text names no command-line option."""

    def __init__(self, *, pids: Sequence[int] = (), command: Sequence[str] | None = None,
                 primitive: str | Sequence[str] = "auto", input: str | None = None,
                 input_format: str = "csv", attrs: Attrs | None = None,
                 filters: Sequence[Filter] = (), probes: Sequence[Probe] = (),
                 breakdown: Sequence[str] = (), ranges: Sequence[tuple[int, int]] | None = None,
                 duration_ns: int | None = None, seed: int | None = None,
                 page_nodes: bool = True, regions_follow_origin: bool | None = None,
                 probe_weights: dict[str, int] | None = None,
                 cpu_nodes: str | None = None, physical: bool = False,
                 options: dict[str, dict] | None = None, stop: StopFlag | None = None,
                 log: Callable[[str], None] | None = None,
                 on_tick: Callable[[int], None] | None = None,
                 latency_ns: int | None = None) -> None:
        """``attrs``: None for each primitive's defaults (DAMON's).  ``options``: per
        primitive name, its own options (hint's ``scan_period_ms``, external's
        ``socket_path``...).  ``log``: where one-line notes for the user go (the CLI
        prints them on stderr; default: nowhere).  ``input``: a replay file (CSV, or perf
        script output with ``input_format="perf-script"``).  ``cpu_nodes``: replay only,
        the recorded machine's CPU-to-node map (``"0-3=0,4-7=1"``) for reports whose
        input gives no node; default: this machine's.  ``physical``: the kernel
        primitive monitors the physical address space over ``ranges`` (no pids).
        ``latency_ns``: with observational primitives only (hint, pmu, external), how
        long a finished aggregation interval may wait before its snapshots are handed
        over; the due ones are closed together, so the loop wakes once per latency
        instead of once per interval.  The snapshots are the same.  Default
        DEFAULT_LATENCY_NS (1 s, or the aggregation interval when that is longer); 0:
        each interval as it ends, as schemes that act on it need."""
        self.pids = [int(p) for p in pids]
        self.command = list(command or [])
        self.input = input
        self.input_format = input_format
        self.names = split_primitives(primitive)
        self.attrs_given = attrs
        self.filters = list(filters)
        self.user_probes = list(probes)
        self.kinds = list(breakdown)
        self.ranges = [tuple(r) for r in ranges] if ranges is not None else None
        self.duration_ns = duration_ns
        self.seed = seed
        self.use_page_nodes = page_nodes
        self.follow_origin = regions_follow_origin
        self.probe_weights = dict(probe_weights or {})
        self.cpu_nodes = cpu_nodes
        self.physical = physical
        if latency_ns is not None and latency_ns < 0:
            raise UsageError(f"latency must not be negative, not {latency_ns} ns")
        self.latency_ns = DEFAULT_LATENCY_NS if latency_ns is None else int(latency_ns)
        self.options = {k: dict(v) for k, v in (options or {}).items()}
        self.stop_flag = stop or StopFlag()
        self.log = log or (lambda msg: None)
        self.on_tick = on_tick
        self.primitives: list[Primitive] = []
        self.monitor: Monitor | None = None
        self.header: dict = {}
        self.result = SessionResult("duration")
        self.notes: list[str] = []  # end notes (the record's end line)
        self.warnings: list[str] = []  # what the user must hear at the end
        self.launched = None
        self.replay_reader = None  # replay: the ReplayPrimitive
        self.attrs: Attrs | None = None
        self._started = False
        self._closed = False
        self._released = True
        self._start_notes: list[str] = []
        self._breakdown_notes: list[str] = []
        self._supplied_note = ""
        self._lookup = None
        self._names: NameTracker | None = None  # live: mapping and thread names
        self._perf_stats = None
        self._resolve()

    # -- what the session is -------------------------------------------------------

    @property
    def replay(self) -> bool:
        return self.names == ["replay"]

    def _resolve(self) -> None:
        if self.names == ["auto"]:
            if self.input not in (None, "-"):
                self.names = ["replay"]
            elif self.input == "-" or self.options.get("external", {}).get("socket_path"):
                self.names = ["external"]
            else:
                name, why = registry.choose_live()
                self.names = [name]
                self.log(why)
        if "auto" in self.names:
            raise UsageError("'auto' picks one primitive: name them all when giving several")
        for n in self.names:
            registry.entry(n)  # unknown names are bad usage
        self._check_own_monitor()
        if "replay" in self.names and len(self.names) > 1:
            raise UsageError("replay reads a recorded input and runs alone")
        if self.replay:
            if not self.input:
                raise UsageError("the replay primitive needs an input file")
            if self.command:
                raise UsageError("replay reads recorded reports; it cannot launch a command")
        else:
            for n in self.names:
                if not registry.entry(n).live:
                    raise UsageError(f"primitive {n!r} does not monitor live processes")
            if self.physical:
                if self.pids or self.command or not self.ranges:
                    raise UsageError("the physical address space is monitored over physical "
                                     "ranges, without pids or a command")
            elif bool(self.pids) == bool(self.command):
                raise UsageError("give the target: pids or a command to launch (one of them)")
        kinds = {registry.entry(n).name for n in self.names}
        controlled = [n for n in self.names if n in ("wp", "rwp")]
        if len(controlled) > 1:
            raise UsageError(f"{' and '.join(controlled)} cannot share a session: both protect "
                             "pages with the target's userfaultfd (one controlled primitive "
                             "per session)")
        del kinds
        first = registry.entry(controlled[0] if controlled else self.names[0])
        self.attrs = (self.attrs_given or Attrs(sample_us=first.default_sample_us,
                                                aggr_us=first.default_aggr_us)).validate()
        if controlled and len(self.names) > 1 and not any(
                f.type == "source" for f in self.filters):
            # nr_accesses keeps DAMON's meaning: the controlled primitive's samples
            self.filters = [*parse_conditions(f"source:{controlled[0]}"), *self.filters]
            self.log(f"nr_accesses counts {controlled[0]}'s samples (sample filter "
                     f"source:{controlled[0]}); "
                     f"{', '.join(n for n in self.names if n != controlled[0])} feed the probes")
        missing = native_missing(bool(controlled), traced="hint" in self.names)
        if missing:
            self.log(missing)

    def _check_own_monitor(self) -> None:
        """A primitive with a monitor of its own (the kernel's DAMON) supplies the regions
        and nr_accesses; observational primitives beside it (hint) supply what only
        reports carry (CPU, thread, read/write) as probes over those regions.  Without
        them it has no sample filters and no origin breakdowns."""
        from udamon.probes.filters import KERNEL_ONLY_TYPES

        own = [n for n in self.names if registry.entry(n).own_monitor]
        if self.physical and self.names != own[:1]:
            raise UsageError("only the kernel primitive monitors the physical address space")
        if not own:
            for f in [*self.filters, *(f for p in self.user_probes for f in p.filters)]:
                if f.type in KERNEL_ONLY_TYPES:
                    raise UsageError(f"filter type {f.type!r} is evaluated by the kernel's "
                                     f"DAMON only (kernel primitive probes); reports from "
                                     f"{', '.join(self.names)} do not say what backs a page")
            return
        others = [n for n in self.names if n != own[0]]
        bad = [n for n in others if n in ("wp", "rwp") or registry.entry(n).own_monitor]
        if bad:
            raise UsageError(f"the {own[0]} primitive supplies the regions and nr_accesses; "
                             f"{bad[0]} samples regions of its own and cannot join it (an "
                             "observational primitive can: hint, pmu, external)")
        if others:
            self._check_kernel_with_observers(own[0], others)
            return
        if self.filters:
            raise UsageError(f"the {own[0]} primitive has no sample filters (the kernel's "
                             "per-CPU, thread and read/write sample filters are not "
                             "upstream): sample filters cannot be used with it")
        if self.kinds == [breakdown_mod.AUTO]:
            self.kinds = []  # the default: nothing to break down
        if self.kinds:
            raise UsageError(f"breakdown {','.join(self.kinds)}: the {own[0]} primitive cannot "
                             "tell which CPU, node or thread made an access, nor read from "
                             "write; use a primitive that reports them (hint, rwp)")
        for p in self.user_probes:
            bad = [f.type for f in p.filters if f.type not in KERNEL_ONLY_TYPES]
            if bad:
                raise UsageError(
                    f"probe {p.name!r}: the kernel's DAMON cannot tell {bad[0]!r} (its probe "
                    f"filters are {', '.join(KERNEL_ONLY_TYPES)}; per-CPU, thread, read and "
                    "write sample filters are not upstream): use a primitive that reports "
                    "who and how (hint, rwp, wp) for that probe")

    def _check_kernel_with_observers(self, own: str, others: list[str]) -> None:
        """kernel,hint: nr_accesses are the kernel's, so sample filters have nothing to
        select; the kernel's probe filters go to the kernel, the others to udamon's
        probes over the kernel's regions (the observers' reports)."""
        from udamon.probes.filters import KERNEL_ONLY_TYPES

        if self.filters:
            raise UsageError(f"with {own}, nr_accesses are the kernel's: sample filters "
                             f"have nothing to select ({', '.join(others)} feed the probes)")
        for p in self.user_probes:
            types = {f.type for f in p.filters}
            if types & set(KERNEL_ONLY_TYPES) and types - set(KERNEL_ONLY_TYPES):
                raise UsageError(f"probe {p.name!r} mixes the kernel's probe filters "
                                 f"({', '.join(KERNEL_ONLY_TYPES)}) with conditions only "
                                 "reports carry: split it into two probes")
        self._supplied_note = (f"{own} supplies the regions and nr_accesses; the probes "
                               f"count {', '.join(others)}'s reports over them")

    # -- start / stop --------------------------------------------------------------

    def start(self) -> Session:
        """Attach (or open the input), build the probes, the monitor and the header."""
        if self._started:
            return self
        self._started = True
        try:
            if self.replay:
                self._start_replay()
            else:
                self._start_live()
        except BaseException:
            self.close()
            raise
        return self

    def _probes(self, cpus=(), nodes=(), tids=()) -> list[Probe]:
        follow = self.follow_origin
        if follow is None:  # as asked: 'auto' does not change how regions adjust
            follow = any(k in breakdown_mod.ORIGIN_KINDS for k in self.kinds)
        kinds, self._breakdown_notes = breakdown_mod.expand_auto(
            self.kinds, ncpus=len(list(cpus)), nnodes=len(set(nodes)), ntids=len(set(tids)))
        try:
            extra = (breakdown_mod.breakdown_probes(kinds, cpus=cpus, nodes=nodes,
                                                    tids=tids, follow_origin=follow)
                     if self.kinds else [])
        except ValueError as e:
            raise UsageError(str(e)) from None
        probes = self.user_probes + extra
        names = [p.name for p in probes]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise UsageError(f"probe names clash with breakdown probes: {', '.join(clash)}")
        unknown = set(self.probe_weights) - set(names)
        if unknown:
            raise UsageError(f"no probe named {', '.join(sorted(unknown))} to weigh "
                             f"(probes: {', '.join(names) or 'none'})")
        return [replace(p, weight=self.probe_weights[p.name]) if p.name in self.probe_weights
                else p for p in probes]

    def _start_live(self) -> None:
        from udamon.system.perf_tracepoint import online_cpus
        from udamon.targets.launch import Launched
        from udamon.targets.page_nodes import PageNodeLookup
        from udamon.targets.procmaps import read_vmas, thread_ids, vaddr_provider
        from udamon.targets.topology import cpu_to_node

        assert self.attrs is not None
        attrs = self.attrs
        # privileges first: a user who may not use a primitive at all must hear that,
        # not that some /proc file of a process they do not own cannot be read
        for n in self.names:
            opts = dict(self.options.get(n, {}))
            if registry.entry(n).own_monitor:  # it sets up its monitor's ranges itself
                opts.update(ranges=self.ranges, paddr=self.physical)
            self.primitives.append(registry.make_live(n, attrs, **opts))
        # what a primitive counts itself (the kernel's probes) is not the monitor's
        claimed = {name for p, n in zip(self.primitives, self.names, strict=True)
                   if registry.entry(n).own_monitor for name in p.claim_probes(self._probes())}
        for pid in self.pids:
            read_vmas(pid)  # TargetGone: no such process
        self.launched = Launched(self.command) if self.command else None
        self._released = self.launched is None
        targets = [self.launched.pid] if self.launched else list(self.pids)
        if self.physical:
            targets = [0]  # the physical address space
        entries = [registry.entry(n) for n in self.names]
        early = [p for p, e in zip(self.primitives, entries, strict=True) if e.attach_before_exec]
        late = [p for p in self.primitives if p not in early]
        for p in early:  # tracers follow the exec
            p.start(targets)
        if self.launched:
            self.launched.release()
            self._released = True
        for p in late:  # needs the program's own mappings
            p.start(targets)
        if self._supplied_note:
            self.log(self._supplied_note)
        cpus: list[int] = []
        nodes: set[int] = set()
        tids: set[int] = set()
        if self.kinds:
            cpus = online_cpus()
            table = cpu_to_node()
            nodes = {int(table[c]) for c in cpus if c < table.size and table[c] >= 0}
            for pid in targets:
                try:
                    tids.update(thread_ids(pid))
                except TargetGone:
                    pass
        probes = self._probes(cpus, nodes, tids)
        controlled = any(p.kind == "controlled" for p in self.primitives)
        observed = all(p.kind == "observational" for p in self.primitives)
        self.monitor = Monitor(attrs, self.filters,
                               [p for p in probes if p.name not in claimed], seed=self.seed,
                               count_written_pages=observed, sampled=controlled)
        gone = sorted({pid for p in self.primitives for pid in p.gone_at_start()})
        for pid in targets:
            if pid in gone:
                continue
            try:
                if self.physical:
                    self.monitor.add_target(pid, self.ranges, name="paddr")
                    continue
                provider = None if self.ranges is not None else vaddr_provider(pid)
                # a launched command's name is what it exec'd (read before the exec
                # finished, /proc/PID/comm can still say udamon's)
                name = self.launched.comm if self.launched is not None else None
                self.monitor.add_target(pid, self.ranges, provider=provider, name=name)
            except TargetGone:
                gone.append(pid)
        if not self.monitor.targets:
            raise RuntimeFailure(
                f"{self.command[0]} (pid {gone[0]}) exited before monitoring started"
                if self.launched else f"process {gone[0]} does not exist" if len(gone) == 1
                else f"processes {', '.join(map(str, gone))} exited before monitoring started")
        gone_notes = [f"process {pid} exited before monitoring started; monitoring the others"
                      for pid in gone]
        for n in gone_notes:
            self.log(n)
        self._start_notes = ([n for p in self.primitives for n in p.stats().notes] + gone_notes
                             + self._breakdown_notes)
        extra: dict = {"command": self.command} if self.command else {}
        for p in self.primitives:
            extra.update(p.stats().header)
        if len(self.primitives) > 1:
            extra["primitives"] = [{"name": p.name, "kind": p.kind, "coverage": p.coverage}
                                   for p in self.primitives]
        if not self.physical:  # physical memory has no maps and no threads
            self._names = NameTracker(attrs.update_us * 1000)
            for t in self.monitor.targets:
                self._names.add(t.pid, t.provider)
        drive = next((p for p in self.primitives if p.kind != "observational"),
                     self.primitives[0])
        self.header = describe(attrs, ",".join(self.names), drive.coverage, self.filters,
                               probes, self.monitor.targets, clock="monotonic",
                               notes=self._start_notes,
                               written_pages=self.monitor.count_written_pages, **extra)
        for td in self.header["targets"] if self._names else []:  # threads' names at start
            names = self._names.threads(td["pid"])
            if names:
                td["threads"] = {str(k): v for k, v in sorted(names.items())}
        self._lookup = PageNodeLookup() if self.use_page_nodes else None

    def _start_replay(self) -> None:
        from udamon.primitives.perf_script import PerfScriptStats, read_perf_script
        from udamon.primitives.replay import CHUNK, ReplayPrimitive, read_csv, summarize

        assert self.attrs is not None and self.input is not None
        if not os.path.exists(self.input):
            raise UsageError(f"{self.input}: no such file")
        perf = self.input_format == "perf-script"
        stats = PerfScriptStats() if perf else None
        self._perf_stats = stats

        def reader(path, chunk=CHUNK, linenos=None, stats=None):
            if perf:
                return read_perf_script(path, chunk, linenos, stats)
            return read_csv(path, chunk, linenos)

        table = None
        if self.cpu_nodes is not None:
            from udamon.targets.topology import parse_cpu_nodes
            try:
                table = parse_cpu_nodes(self.cpu_nodes)
            except ValueError as e:
                raise UsageError(f"CPU-to-node map {self.cpu_nodes!r}: {e}") from None
        summary = (summarize(self.input, reader=reader, cpu_nodes=table)
                   if self.ranges is None or not self.pids or self.kinds else None)
        per_pid = summary.ranges if summary else {}
        targets = self.pids or sorted(per_pid)
        if summary and self.kinds:
            probes = self._probes(summary.cpus, summary.nodes,
                                  set().union(*[summary.tids.get(p, set()) for p in targets]))
        else:
            probes = self._probes()
        if not targets:
            raise UsageError(f"{self.input}: holds no reports, nothing to monitor")
        self.monitor = Monitor(self.attrs, self.filters, probes, seed=self.seed,
                               cpu_nodes="local" if table is None else table)
        for pid in targets:
            r = self.ranges if self.ranges is not None else per_pid.get(pid)
            if not r:
                raise UsageError(f"pid {pid} has no reports in {self.input}; pids there: "
                                 f"{', '.join(map(str, sorted(per_pid))) or 'none'}")
            self.monitor.add_target(pid, r, name=f"replay:{pid}")
        prim = ReplayPrimitive(self.input, reader=lambda p, c, ln: reader(p, c, ln, stats))
        if perf:  # faults and precise samples see some accesses, not all of them
            prim.coverage = "unknown"
        self.replay_reader = prim
        extra = {"input_format": "perf-script"} if perf else {}
        self.header = describe(self.attrs, "replay", prim.coverage, self.filters, probes,
                               self.monitor.targets, input=os.path.abspath(self.input),
                               written_pages=self.monitor.count_written_pages, **extra)

    def close(self) -> None:
        """Stop every primitive (restoring system settings); idempotent.  A launched
        command keeps running: ``launched`` is its handle."""
        if self._closed:
            return
        self._closed = True
        for p in self.primitives:
            try:
                p.stop()
            except Exception:  # pragma: no cover - teardown must go on
                pass
        if self.launched is not None and not self._released:
            self.launched.release()
            self._released = True

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running -------------------------------------------------------------------

    def __iter__(self) -> Iterator[Snapshot]:
        """The snapshots, one per target per aggregation interval, as they close;
        ``result`` and ``notes`` say how the session ended once the loop is done."""
        self.start()
        assert self.monitor is not None
        if self.replay:
            assert self.replay_reader is not None
            yield from iter_replay(self.monitor, self.replay_reader.chunks(), self.stop_flag,
                                   self._count_progress, where=self.replay_reader.where,
                                   result=self.result)
            if self._perf_stats is not None:
                self.notes = self._perf_stats.notes()
            return
        try:
            yield from iter_live(self.monitor, self.primitives, duration_ns=self.duration_ns,
                                 stop=self.stop_flag, on_tick=self.on_tick,
                                 page_nodes=self._lookup, result=self.result,
                                 latency_ns=self.latency_ns,
                                 annotate=self._names.annotate if self._names else None)
        finally:
            self._closed = True  # iter_live stopped every primitive
            self.notes = [n for n in self.result.notes if n not in self._start_notes]
            if self._lookup is not None and self._lookup.stats.reports:
                self.notes.append(self._lookup.stats.note())
            self.warnings = [w for p in self.primitives for w in p.stats().warnings]

    progress: Callable[[int], None] | None = None  # replay: reports read so far

    def _count_progress(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def run(self, sinks: Sequence[Sink]) -> SessionResult:
        """Start, hand every snapshot to the sinks, end them; ``fail`` them on error."""
        begun: list[Sink] = []
        try:
            self.start()
            assert self.monitor is not None
            for s in sinks:
                s.begin(self.header, self.monitor)
                begun.append(s)
            for snap in self:
                for s in sinks:
                    s.snapshot(snap)
            for s in sinks:
                s.end(self.result, self.monitor, self.notes)
        except BaseException as e:
            self.close()
            for s in begun:
                s.fail(str(e) or type(e).__name__)
            raise
        finally:
            self.close()
        return self.result


def native_missing(controlled: bool, traced: bool = False) -> str:
    """The one-line notice of a session that runs without udamon's C extensions (the
    install could not build them): the same algorithms in Python, at a higher CPU cost.
    ``traced``: a primitive reads the page-fault tracer (hint).  Empty when they are
    there."""
    from udamon.core import regions
    from udamon.primitives import uffd_loop

    names = ([] if regions.native() else ["udamon.core._regions (region merge and split)"])
    if controlled and not uffd_loop.native():
        names.append("udamon.primitives._uffd_loop (the sampling turns)")
    if traced:
        from udamon.system import perf_tracepoint

        if not perf_tracepoint.native():
            names.append("udamon.system._perf_ring (the fault tracer's ring reader)")
    if not names:
        return ""
    from udamon import native

    why = (f"{native.PURE_PYTHON_ENV}=1" if native.pure_python_asked()
           else "not built; reinstall with a C compiler and the Python headers, e.g. "
                "apt-get install gcc python3-dev")
    return (f"running without the C extension(s) {' and '.join(names)} ({why}): the same "
            "algorithm in Python, at a higher CPU cost")


def stderr_log(msg: str) -> None:
    """The CLI's ``log``: one note line on stderr."""
    print(f"udamon: note: {msg}", file=sys.stderr)
