"""``udamon place``: cache-aware thread placement of one process, planned from the
sharing udamon observes, applied with sched_setaffinity, checked by a second window,
and undone from the record of the previous masks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from udamon.cli import live
from udamon.cli.common import typed
from udamon.core.monitor import Monitor
from udamon.core.session import SessionResult
from udamon.errors import RuntimeFailure, TargetGone, UsageError
from udamon.report import placement as place_report
from udamon.report import placement_plan as plan_out
from udamon.schemes import affinity, placement
from udamon.targets import threads as thr
from udamon.targets.topology import (
    Topology,
    format_cpulist,
    given_topology,
    node_topology,
    parse_cpulist,
    read_topology,
)

DEFAULT_WINDOW_NS = 10_000_000_000

DESCRIPTION = """\
Place the threads of a process so that threads which share data run in the same
last-level-cache (LLC) domain, and check that it worked.

1. Observe: a monitoring window (--duration, default 10s) with per-thread, per-CPU and
   read/write probes over the process's data mappings (or a record given with -i).
2. Plan: threads are grouped by the bytes they share (report sharing's matrix; write
   sharing weighs --write-weight times read sharing, because a line written in one
   LLC must be fetched by the other) and each group goes into one LLC domain, as
   long as the domain has the CPU for them (their CPU use from /proc/PID/task/TID/
   stat).  A thread only goes where its cgroup cpuset and its current
   affinity allow (--cpus-allowed widens the latter); threads without sharing are
   left alone.  The plan says how much of the sharing crosses domains now and would
   with the plan.
3. Apply (--apply): each moved thread's affinity is set with sched_setaffinity,
   after its previous mask was written to an undo record; threads that appeared or
   left since the plan, or whose mask changed, are reported and not touched.
   --dry-run says what --apply would do.  --undo FILE restores the masks.
4. Check: after --apply, a second window (--check-duration) measures again which
   share of the accesses to shared data came from outside the data's main domain,
   and prints it next to the first window's.

On a machine with one LLC domain there is nothing to place: the command says so.
Placement helps when threads WRITE data that threads in another LLC read or write;
read-only sharing across LLCs costs little.  docs/placement.md explains when it
helps, when not, and how to read the output.
"""

EPILOG = """\
examples:
  udamon place --show-topology
  udamon place --pid 1234 --duration 30s                 # plan only
  udamon place --pid 1234 --duration 30s --dry-run       # ... and what --apply would set
  udamon place --pid 1234 --duration 30s --apply         # set masks, check, print undo file
  udamon place --undo udamon-place-1234-20261201-101500.undo.json
  udamon place -i rec.jsonl --pid 1234 --save-plan plan.json   # from a record
  udamon place --plan plan.json --apply                  # apply a saved plan later
  udamon place --pid 1234 --domains node --apply         # place by NUMA node instead

exit codes: 0 ok (also when nothing needs to move), 1 runtime failure (a mask could
not be set, the process exited), 2 bad usage or input."""


def _weight(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1000:
        raise ValueError("must be within (0, 1000]")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise ValueError("must be within 0..1")
    return v


def _load(text: str) -> float:
    v = float(text)
    if not 0.1 <= v <= 100:
        raise ValueError("must be within 0.1..100")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("place", help="cache-aware thread placement: plan, apply, check, undo",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("placement")
    _action_args(g)
    _plan_args(g)
    live.add_session_args(p, replay=False)
    _retell_session_args(p)
    p.set_defaults(func=run)


def _action_args(g) -> None:
    g.add_argument("--show-topology", action="store_true",
                   help="print the LLC domains and NUMA nodes of this machine and exit")
    g.add_argument("-i", "--input", metavar="RECORD",
                   help="plan from this record (made with --breakdown thread,cpu,rw) instead "
                        "of a monitoring window; the process must still run")
    g.add_argument("--plan", metavar="FILE",
                   help="use a plan saved with --save-plan (with --apply or --dry-run)")
    g.add_argument("--save-plan", metavar="FILE", help="write the plan (JSON) to FILE")
    g.add_argument("--apply", action="store_true",
                   help="set the planned masks, then run the check window")
    g.add_argument("--dry-run", action="store_true",
                   help="say what --apply would set (and --undo would restore); change nothing")
    g.add_argument("--undo", metavar="FILE",
                   help="restore the masks recorded in an undo record of --apply")
    g.add_argument("--force", action="store_true",
                   help="with --undo: restore also masks that changed since the apply")
    g.add_argument("--undo-record", metavar="FILE",
                   help="where --apply writes the previous masks (default "
                        "./udamon-place-PID-TIME.undo.json; an existing file is never "
                        "replaced)")
    g.add_argument("--check-duration", metavar="DUR", type=typed(live.duration_arg, "duration"),
                   help="length of the check window after --apply (default: --duration)")
    g.add_argument("--no-check", action="store_true", help="no check window after --apply")
    g.add_argument("--record", metavar="FILE", help="keep the planning window's record")
    g.add_argument("--check-record", metavar="FILE", help="keep the check window's record")
    g.add_argument("--format", choices=["text", "json"], default="text",
                   help="text (default) or one JSON object")


def _plan_args(g) -> None:
    g.add_argument("--domains", metavar="llc|node|CPUS/CPUS...", default="llc",
                   help="what to place into: llc (default: CPUs sharing a last-level cache), "
                        "node (NUMA nodes) or CPU lists separated by '/' (e.g. 0-3/4-7)")
    g.add_argument("--cpus-allowed", metavar="LIST",
                   help="let the plan use these CPUs for every thread instead of its current "
                        "affinity (the cgroup cpuset still bounds it), e.g. to redo a bad "
                        "manual pinning")
    g.add_argument("--write-weight", metavar="W", type=typed(_weight, "weight"),
                   default=placement.DEFAULT_WRITE_WEIGHT,
                   help="how much more a shared byte in written regions counts than one only "
                        "read (default %(default)g)")
    g.add_argument("--max-load", metavar="R", type=typed(_load, "load"), default=1.0,
                   help="CPU use a domain may take per CPU it has (default 1, +10%% for "
                        "measurement noise)")
    g.add_argument("--min-join", metavar="F", type=typed(_fraction, "fraction"),
                   default=placement.DEFAULT_MIN_JOIN,
                   help="a pair is brought together only when it shares at least this "
                        "fraction of the bytes the less active of the two accessed "
                        "(default %(default)g)")


def _retell_session_args(p) -> None:
    """The session options, as place uses them."""
    for act in p._actions:
        if act.dest == "duration":
            act.help = "length of the monitoring window (default 10s)"
        elif act.dest == "pid":
            act.metavar, act.help = "PID", "the process whose threads to place"
        elif act.dest in ("command", "no_page_nodes"):
            act.help = argparse.SUPPRESS
        elif act.dest == "breakdown":
            act.help = "more automatic probes (place always adds thread, cpu and rw)"


def run(a: argparse.Namespace) -> int:
    if a.show_topology:
        return _show_topology(a)
    if a.undo:
        return _undo(a)
    if a.force:
        raise UsageError("--force is for --undo")
    if a.command and a.command != ["--"]:
        raise UsageError("udamon place works on a running process (--pid PID), it does not "
                         "launch commands")
    if a.plan:
        return _from_saved(a)
    topo = _topology(a)
    rec, pid = _planning_input(a)
    if len(topo.domains) < 2:
        return _one_domain(a, pid, topo)
    if a.input:
        rec, sampler, window = _record_window(a, rec, pid)
    else:
        rec, sampler, window = _live_window(a, pid)
    infos = _thread_infos(pid, sampler, topo, a.cpus_allowed)
    sh = place_report.sharing_from_record(rec, pid)
    p = placement.plan(topo, list(infos.values()), sh, write_weight=a.write_weight,
                       max_load=a.max_load, min_join=a.min_join)
    doc = plan_out.plan_doc(pid, p, place_report.measured_cross(rec, pid, topo), window)
    if a.save_plan:
        plan_out.save_plan(a.save_plan, doc)
    return _act(a, pid, doc, topo)


def _planning_input(a: argparse.Namespace):
    """The record to plan from (-i), or None, and the process, which must run."""
    pids = [p for group in a.pid for p in group]
    if len(pids) > 1:
        raise UsageError("give one process (--pid PID): placement plans one process's threads")
    pid = pids[0] if pids else None
    rec = None
    if a.input:
        from udamon.cli.common import open_record
        from udamon.report.common import pick_pid

        rec = open_record(a.input, pid)
        pid = pick_pid(rec, pid)
    if pid is None:
        raise UsageError("give the process: --pid PID (or -i RECORD)")
    if not thr.read_stat(pid, pid):
        raise UsageError(f"process {pid} does not exist (or has exited)"
                         + (f"; a plan from {a.input} needs it running" if a.input else ""))
    return rec, pid


# -- topology ---------------------------------------------------------------------


def _topology(a: argparse.Namespace) -> Topology:
    base = read_topology()
    spec = a.domains.strip()
    if spec == "llc":
        return base
    if spec == "node":
        return node_topology(base)
    try:
        groups = [parse_cpulist(x) for x in spec.split("/")]
        return given_topology(groups, base)
    except ValueError as e:
        raise UsageError(f"bad --domains {a.domains!r}: {e} (llc, node, or CPU lists "
                         "separated by '/')") from None


def _show_topology(a: argparse.Namespace) -> int:
    topo = _topology(a)
    if a.format == "json":
        json.dump(topo.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(plan_out.topology_text(topo))
    return 0


def _one_domain(a: argparse.Namespace, pid: int, topo: Topology) -> int:
    why = plan_out.one_domain_reason(topo)
    if a.format == "json":
        json.dump({"format": plan_out.PLAN_FORMAT, "version": plan_out.PLAN_VERSION, "pid": pid,
                   "topology": topo.to_dict(), "plan": None, "reason": why,
                   "apply": None}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(plan_out.topology_text(topo) + f"udamon place: process {pid}: {why}\n")
    return 0


# -- the monitoring windows ----------------------------------------------------------


def _data_ranges(pid: int) -> list[tuple[int, int]]:
    """Every mapping that can hold data (not code, not PROT_NONE guards, not the vDSO),
    each its own range: a region then never spans two mappings, so two buffers that
    neighbour in memory are not mistaken for one shared region."""
    from udamon.targets.procmaps import read_vmas

    vmas = read_vmas(pid)
    out = [(v.start, v.end) for v in vmas
           if v.perms[:3] != "---" and "x" not in v.perms[:3]
           and v.path not in ("[vsyscall]", "[vvar]", "[vdso]", "[vvar_vclock]")]
    if not out:
        raise UsageError(f"process {pid} has no data mappings to monitor")
    return sorted(out)


def _spec(a: argparse.Namespace, pid: int) -> live.SessionSpec:
    """The live session of a window (``a`` is a copy of the options: it is changed)."""
    from udamon.probes.breakdown import MAX_THREAD_PROBES

    try:
        nthreads = len(thr.list_threads(pid))
    except TargetGone as e:
        raise UsageError(str(e)) from None
    if nthreads > MAX_THREAD_PROBES:
        raise UsageError(f"process {pid} has {nthreads} threads; udamon place follows at most "
                         f"{MAX_THREAD_PROBES} (one probe each)")
    a.pid = [[pid]]
    a.command = []
    a.input = None  # -i is the planning input, not a replay of this window
    a.no_page_nodes = True  # placement does not need page locations
    spec = live.resolve(a, replay=False)
    for k in ("thread", "cpu", "rw"):
        if k not in spec.kinds:
            spec.kinds.append(k)
    if spec.ranges is None:
        try:
            spec.ranges = _data_ranges(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
    return spec


class SamplerSink:
    """Samples the threads (CPU use, runnable time, where they run) at every snapshot."""

    def __init__(self, pid: int):
        self.sampler = thr.ThreadSampler(pid)
        self.result: SessionResult | None = None

    def begin(self, header: dict, monitor: Monitor) -> None:
        self.sampler.sample()

    def snapshot(self, snap) -> None:
        self.sampler.sample()

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        self.sampler.sample()
        self.result = res

    def fail(self, error: str) -> None:
        pass


def _window(a: argparse.Namespace, spec: live.SessionSpec, pid: int, duration_ns: int,
            keep: str | None):
    from udamon.cli.record import RecordSink
    from udamon.record.reader import read_record

    a.duration = duration_ns
    tmpdir = None
    path = keep
    if path is None:
        tmpdir = tempfile.mkdtemp(prefix="udamon-place-")
        path = os.path.join(tmpdir, "window.jsonl")
    sampler = SamplerSink(pid)
    try:
        live.run_session(a, spec, [RecordSink(path, True), sampler],
                         progress=a.format == "text")
        rec = read_record(path)
    finally:
        if tmpdir is not None:
            for f in os.listdir(tmpdir):
                os.unlink(os.path.join(tmpdir, f))
            os.rmdir(tmpdir)
    res = sampler.result or SessionResult("error")
    return rec, sampler.sampler, res


def _record_window(a: argparse.Namespace, rec, pid: int):
    sampler = thr.ThreadSampler(pid)
    for _ in range(11):  # CPU use and residency over one second, now
        sampler.sample()
        time.sleep(0.1)
    window = {"source": "record", "record": a.input, "snapshots": len(rec.snapshots_of(pid)),
              "primitive": rec.header.get("primitive")}
    return rec, sampler, window


def _live_window(a: argparse.Namespace, pid: int):
    ns = argparse.Namespace(**vars(a))
    spec = _spec(ns, pid)
    duration = a.duration or DEFAULT_WINDOW_NS
    rec, sampler, res = _window(ns, spec, pid, duration, a.record)
    if res.reason == "interrupted":
        raise KeyboardInterrupt
    if res.reason == "targets-exited":
        raise RuntimeFailure(f"process {pid} exited during the monitoring window")
    window = {"source": "live", "record": a.record, "duration_s": duration / 1e9,
              "snapshots": len(rec.snapshots_of(pid)), "primitive": spec.primitive}
    return rec, sampler, window


def _thread_infos(pid: int, sampler: thr.ThreadSampler, topo: Topology,
                  cpus_allowed: str | None) -> dict[int, placement.ThreadInfo]:
    widen = None
    if cpus_allowed is not None:
        try:
            widen = frozenset(parse_cpulist(cpus_allowed))
        except ValueError as e:
            raise UsageError(f"bad --cpus-allowed {cpus_allowed!r}: {e}") from None
        bad = widen - set(topo.cpus)
        if bad or not widen:
            raise UsageError(f"--cpus-allowed {cpus_allowed!r}: CPU {format_cpulist(bad)} is not "
                             f"online (online: {format_cpulist(topo.cpus)})" if bad else
                             "--cpus-allowed needs at least one CPU")
    try:
        return placement.thread_infos(pid, sampler, topo, widen)
    except TargetGone as e:
        raise RuntimeFailure(f"{e}: nothing to place") from None


# -- apply and check -------------------------------------------------------------------


def _act(a: argparse.Namespace, pid: int, doc: dict, topo: Topology) -> int:
    """Print the plan, apply it (--apply / --dry-run), run the check window."""
    if a.format == "text":
        sys.stdout.write(plan_out.plan_text(doc))
    rc = 0
    if a.apply or a.dry_run:
        res = _apply(a, pid, doc)
        rc = 1 if res.failed else 0
        if a.apply and not a.dry_run and not a.no_check and res.count("set"):
            _check(a, pid, doc, topo)
    if a.format == "json":
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return rc


def _apply(a: argparse.Namespace, pid: int, doc: dict) -> affinity.Result:
    planned = [affinity.Planned(int(t["tid"]), int(t["starttime"]), str(t.get("comm", "")),
                                frozenset(parse_cpulist(t["mask"])),
                                frozenset(parse_cpulist(t["new_mask"])))
               for t in doc["threads"] if t.get("new_mask")]
    known = {int(t["tid"]): (int(t["starttime"]), str(t.get("comm", "")))
             for t in doc["threads"]}
    undo_path = None
    if not a.dry_run and planned:
        undo_path = a.undo_record or os.path.abspath(
            f"udamon-place-{pid}-{time.strftime('%Y%m%d-%H%M%S')}.undo.json")
    res = affinity.apply(pid, doc["pid_starttime"], planned, known, undo_path=undo_path,
                         dry_run=a.dry_run)
    doc["apply"] = res.to_dict() | {"dry_run": a.dry_run}
    if a.format == "text":
        sys.stdout.write(plan_out.apply_text(res, a.dry_run))
    return res


def _check(a: argparse.Namespace, pid: int, doc: dict, topo: Topology) -> None:
    """The second window, with the new masks; its measure goes beside the first's."""
    if a.format == "text":
        sys.stdout.write("\nchecking: a second monitoring window with the new masks ...\n")
        sys.stdout.flush()
    dur = a.check_duration or a.duration or int(doc["window"].get("duration_s", 10) * 1e9)
    rec2 = None
    if thr.read_stat(pid, pid) is not None:  # else it exited since the apply
        ns = argparse.Namespace(**vars(a))
        try:
            rec2, _, _ = _window(ns, _spec(ns, pid), pid, dur, a.check_record)
        except TargetGone:
            pass
    after = (place_report.measured_cross(rec2, pid, topo) if rec2 is not None else
             place_report.CrossMeasure(None, 0, 0, 0, 0, f"process {pid} exited"))
    doc["check"] = {"duration_s": dur / 1e9, "record": a.check_record,
                    "measured_after": after.to_dict()}
    if a.format == "text":
        sys.stdout.write(plan_out.check_text(doc))


def _from_saved(a: argparse.Namespace) -> int:
    if a.input or a.save_plan:
        raise UsageError("--plan uses a saved plan: -i and --save-plan do not go with it")
    doc, topo = plan_out.load_plan(a.plan)
    pid = int(doc["pid"])
    pids = [p for group in a.pid for p in group]
    if pids and pids != [pid]:
        raise UsageError(f"{a.plan} is a plan for process {pid}, not {pids[0]}")
    if thr.read_stat(pid, pid) is None:
        raise UsageError(f"process {pid} of {a.plan} does not exist (or has exited)")
    return _act(a, pid, doc, topo)


def _undo(a: argparse.Namespace) -> int:
    if a.apply or a.plan or a.input or a.pid:
        raise UsageError("--undo FILE restores masks: it takes no --apply, --plan, -i or --pid")
    res = affinity.undo(a.undo, force=a.force, dry_run=a.dry_run)
    if a.format == "json":
        json.dump(res.to_dict() | {"dry_run": a.dry_run}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(plan_out.undo_text(res, a.undo, a.dry_run))
    return 1 if res.failed else 0
