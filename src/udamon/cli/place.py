"""``udamon place``: cache-aware thread placement of one process, planned from the
sharing udamon observes, applied with sched_setaffinity, checked by a second window,
and undone from the record of the previous masks."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

from udamon.cli import live
from udamon.cli.common import typed
from udamon.core.monitor import Monitor
from udamon.core.session import SessionResult
from udamon.errors import InputError, RuntimeFailure, TargetGone, UsageError
from udamon.report import placement as place_report
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
from udamon.units import fmt_size

PLAN_FORMAT = "udamon-place-plan"
PLAN_VERSION = 1
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
    g.add_argument("--check-duration", metavar="DUR", type=typed(live.duration_arg, "duration"),
                   help="length of the check window after --apply (default: --duration)")
    g.add_argument("--no-check", action="store_true", help="no check window after --apply")
    g.add_argument("--record", metavar="FILE", help="keep the planning window's record")
    g.add_argument("--check-record", metavar="FILE", help="keep the check window's record")
    g.add_argument("--format", choices=["text", "json"], default="text",
                   help="text (default) or one JSON object")
    live.add_session_args(p, replay=False)
    for act in p._actions:  # the session options, as place uses them
        if act.dest == "duration":
            act.help = "length of the monitoring window (default 10s)"
        elif act.dest == "pid":
            act.metavar, act.help = "PID", "the process whose threads to place"
        elif act.dest in ("command", "no_page_nodes"):
            act.help = argparse.SUPPRESS
        elif act.dest == "breakdown":
            act.help = "more automatic probes (place always adds thread, cpu and rw)"
    p.set_defaults(func=run)


# -- entry --------------------------------------------------------------------------


def run(a: argparse.Namespace) -> int:
    if a.show_topology:
        return _show_topology(a)
    if a.undo:
        return _undo(a)
    for opt, v in (("--force", a.force),):
        if v:
            raise UsageError(f"{opt} is for --undo")
    if a.command and a.command != ["--"]:
        raise UsageError("udamon place works on a running process (--pid PID), it does not "
                         "launch commands")
    if a.plan:
        return _from_saved(a)
    pids = [p for group in a.pid for p in group]
    if len(pids) > 1:
        raise UsageError("give one process (--pid PID): placement plans one process's threads")
    topo = _topology(a)
    pid = pids[0] if pids else None
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
    if len(topo.domains) < 2:
        return _one_domain(a, pid, topo)
    if a.input:
        sampler = thr.ThreadSampler(pid)
        for _ in range(11):  # CPU use and residency over one second, now
            sampler.sample()
            time.sleep(0.1)
        window = {"source": "record", "record": a.input, "snapshots": len(rec.snapshots_of(pid)),
                  "primitive": rec.header.get("primitive")}
    else:
        ns = argparse.Namespace(**vars(a))
        spec = _spec(ns, pid)
        rec, sampler, res = _window(ns, spec, pid, a.duration or DEFAULT_WINDOW_NS, a.record)
        if res.reason == "interrupted":
            raise KeyboardInterrupt
        if res.reason == "targets-exited":
            raise RuntimeFailure(f"process {pid} exited during the monitoring window")
        window = {"source": "live", "record": a.record, "duration_s": (a.duration or
                                                                      DEFAULT_WINDOW_NS) / 1e9,
                  "snapshots": len(rec.snapshots_of(pid)), "primitive": spec.primitive}
    infos = _thread_infos(pid, sampler, topo, a.cpus_allowed)
    sh = place_report.sharing_from_record(rec, pid)
    p = placement.plan(topo, list(infos.values()), sh, write_weight=a.write_weight,
                       max_load=a.max_load, min_join=a.min_join)
    before = place_report.measured_cross(rec, pid, topo)
    doc = plan_doc(pid, p, before, window)
    if a.save_plan:
        _save(a.save_plan, doc)
    return _act(a, pid, doc, topo)


def _act(a: argparse.Namespace, pid: int, doc: dict, topo: Topology) -> int:
    """Print the plan, apply it (--apply / --dry-run), run the check window."""
    out = sys.stdout
    if a.format == "text":
        out.write(plan_text(doc))
    rc = 0
    if a.apply or a.dry_run:
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
            out.write(apply_text(res, a.dry_run))
        if res.failed:
            rc = 1
        if (a.apply and not a.dry_run and not a.no_check and res.count("set")):
            if a.format == "text":
                out.write("\nchecking: a second monitoring window with the new masks ...\n")
                out.flush()
            dur = a.check_duration or a.duration or int(doc["window"].get("duration_s", 10)
                                                        * 1e9)
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
                out.write(check_text(doc))
    if a.format == "json":
        json.dump(doc, out, indent=1)
        out.write("\n")
    return rc


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


def topology_text(topo: Topology) -> str:
    kind = {"node": "NUMA-node", "given": "given", "machine": "whole-machine"}.get(
        topo.level, topo.level)
    lines = [f"topology: {len(topo.domains)} {kind} domain{'s' if len(topo.domains) != 1 else ''}"
             f" over CPUs {format_cpulist(topo.cpus)} (from {topo.source})"]
    for d in topo.domains:
        nodes = ", ".join(map(str, d.nodes)) or "?"
        plural = "s" if len(d.nodes) > 1 else ""
        lines.append(f"  {d.name}: CPUs {format_cpulist(d.cpus)}  (node{plural} {nodes})")
    lines.append("NUMA nodes: " + (", ".join(f"node{n} CPUs {format_cpulist(c) or '-'}"
                                             for n, c in topo.nodes.items()) or "none listed"))
    return "\n".join(lines) + "\n"


def _show_topology(a: argparse.Namespace) -> int:
    topo = _topology(a)
    if a.format == "json":
        json.dump(topo.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(topology_text(topo))
    return 0


def _one_domain(a: argparse.Namespace, pid: int, topo: Topology) -> int:
    why = (f"this machine has one {topo.level} domain (CPUs {format_cpulist(topo.cpus)}): every "
           "thread shares the same last-level cache, so placement cannot reduce cross-domain "
           "sharing; nothing to do")
    if a.format == "json":
        json.dump({"format": PLAN_FORMAT, "version": PLAN_VERSION, "pid": pid,
                   "topology": topo.to_dict(), "plan": None, "reason": why,
                   "apply": None}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(topology_text(topo) + f"udamon place: process {pid}: {why}\n")
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
        now = thr.list_threads(pid)
    except TargetGone as e:
        raise RuntimeFailure(f"{e}: nothing to place") from None
    online = frozenset(topo.cpus)
    out: dict[int, placement.ThreadInfo] = {}
    for tid, st in now.items():
        try:
            mask = thr.get_mask(tid)
        except ProcessLookupError:
            continue
        cs = thr.cpuset_cpus(pid, tid)
        cpuset = frozenset(cs) if cs is not None else None
        allowed = (widen if widen is not None else mask) & online
        if cpuset is not None:
            allowed &= cpuset
        out[tid] = placement.ThreadInfo(tid, st.comm, st.starttime, mask, cpuset,
                                        frozenset(allowed), sampler.cpu_use(tid),
                                        sampler.runnable(tid),
                                        dict(sampler.seen_on.get(tid, {})))
    return out


# -- the plan document ---------------------------------------------------------------


def plan_doc(pid: int, p: placement.Plan, before: place_report.CrossMeasure, window: dict) -> dict:
    st = thr.read_stat(pid, pid)
    threads = []
    for t in p.threads:
        e = p.entries.get(t.tid)
        res = placement.residency(t, p.topology)
        threads.append({
            "tid": t.tid, "comm": t.comm, "starttime": t.starttime,
            "mask": format_cpulist(t.mask),
            "cpuset": None if t.cpuset is None else format_cpulist(t.cpuset),
            "allowed": format_cpulist(t.allowed),
            "cpu_use": None if t.cpu_use is None else round(t.cpu_use, 3),
            "runnable": None if t.runnable is None else round(t.runnable, 3),
            "runs_in": {p.topology.domains[d].name: round(v, 3) for d, v in res.items()},
            "action": e.action if e else "alone", "why": e.why if e else "",
            "domain": None if e is None or e.domain is None else p.topology.domains[e.domain].name,
            "new_mask": None if e is None or e.new_mask is None else format_cpulist(e.new_mask),
        })
    names = {t.tid: t.comm for t in p.threads}
    return {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "pid": pid,
        "pid_starttime": st.starttime if st else None, "comm": st.comm if st else "",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "topology": p.topology.to_dict(), "window": window,
        "write_weight": p.write_weight, "max_load": p.max_load, "min_join": p.min_join,
        "unit": "bytes per snapshot (mean) of regions both threads accessed",
        "pairs": [{"a": a, "b": b, "a_comm": names.get(a, ""), "b_comm": names.get(b, ""),
                   "read_only": round(r, 1), "written": round(w, 1), "weight": round(x, 1)}
                  for a, b, r, w, x in p.pairs],
        "groups": [{"domain": p.topology.domains[g.domain].name, "tids": g.tids,
                    "load": round(g.load, 3), "limit": round(g.limit, 3),
                    "read_only_inside": round(g.read_inside, 1),
                    "written_inside": round(g.written_inside, 1)} for g in p.groups],
        "threads": threads,
        "loads": {p.topology.domains[d].name: {"before": round(p.loads_before[d], 3),
                                               "after": round(p.loads_after[d], 3)}
                  for d in p.loads_before},
        "predicted": {"cross_share_before": _r(p.predicted_before),
                      "cross_share_after": _r(p.predicted_after),
                      "weight_total": round(p.weight_total, 1)},
        "measured_before": before.to_dict(),
        "notes": p.notes,
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _save(path: str, doc: dict) -> None:
    try:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def _from_saved(a: argparse.Namespace) -> int:
    if a.input or a.save_plan:
        raise UsageError("--plan uses a saved plan: -i and --save-plan do not go with it")
    try:
        with open(a.plan) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{a.plan}: no such file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{a.plan}:{e.lineno}: not JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{a.plan}: cannot read: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise InputError(f"{a.plan}: not a plan saved by 'udamon place --save-plan'")
    if doc.get("version") != PLAN_VERSION:
        raise InputError(f"{a.plan}: plan version {doc.get('version')!r} is not supported")
    try:
        pid = int(doc["pid"])
        for t in doc["threads"]:
            int(t["tid"])
            int(t["starttime"])
            parse_cpulist(t["mask"])
            if t.get("new_mask"):
                parse_cpulist(t["new_mask"])
        topo = _saved_topology(doc["topology"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{a.plan}: malformed plan ({type(e).__name__}: {e})") from None
    pids = [p for group in a.pid for p in group]
    if pids and pids != [pid]:
        raise UsageError(f"{a.plan} is a plan for process {pid}, not {pids[0]}")
    if thr.read_stat(pid, pid) is None:
        raise UsageError(f"process {pid} of {a.plan} does not exist (or has exited)")
    return _act(a, pid, doc, topo)


def _saved_topology(d: dict) -> Topology:
    from udamon.targets.topology import Domain

    doms = tuple(Domain(int(x["id"]), tuple(int(c) for c in x["cpus"]),
                        tuple(int(n) for n in x.get("nodes", [])),
                        re.sub(r"\d+$", "", str(x.get("name", "llc"))) or "llc")
                 for x in d["domains"])
    return Topology(tuple(parse_cpulist(d["cpus"])), doms,
                    {int(n): tuple(parse_cpulist(c)) for n, c in d.get("nodes", {}).items()},
                    str(d.get("level", "?")), str(d.get("source", "saved plan")))


# -- text ------------------------------------------------------------------------


def plan_text(doc: dict) -> str:
    from udamon.report.common import render_table

    pct = placement.pct
    w = doc["window"]
    src = (f"a {w['duration_s']:g} s monitoring window ({w['primitive']}, {w['snapshots']} "
           "snapshots)" if w["source"] == "live" else
           f"record {w['record']} ({w['primitive']}, {w['snapshots']} snapshots)")
    topo = _saved_topology(doc["topology"])
    lines = [f"udamon place: process {doc['pid']} ({doc['comm']}), {len(doc['threads'])} "
             f"threads; sharing from {src}"]
    lines.append(topology_text(topo).rstrip("\n"))
    lines.append("")
    if doc["pairs"]:
        lines.append(f"threads that share (bytes per snapshot of regions both accessed; "
                     f"written sharing weighs {doc['write_weight']:g}x):")
        rows = [["pair", "read-only", "written", "weight"]]
        for q in doc["pairs"][:12]:
            rows.append([f"{q['a']} {q['a_comm']} + {q['b']} {q['b_comm']}",
                         fmt_size(q["read_only"]), fmt_size(q["written"]), fmt_size(q["weight"])])
        lines += render_table(rows)
        if len(doc["pairs"]) > 12:
            lines.append(f"  ... {len(doc['pairs']) - 12} more pairs (--format json has all)")
    else:
        lines.append("no two threads were seen accessing the same region in one snapshot: "
                     "nothing to place (a longer --duration or --aggr lets the primitive see "
                     "more)")
    comm = {t["tid"]: t["comm"] for t in doc["threads"]}
    if doc["groups"]:
        lines.append("\nplan: groups of threads that share, one domain each:")
        for g in doc["groups"]:
            who = ", ".join(f"{t} {comm.get(t, '')}" for t in g["tids"])
            lines.append(f"  {g['domain']}: {who}  (CPU use {g['load']:.2f}, domain limit "
                         f"{g['limit']:.2f}; shared inside: "
                         f"{fmt_size(g['written_inside'])} written, "
                         f"{fmt_size(g['read_only_inside'])} read-only)")
    rows = [["tid", "name", "cpu", "runnable", "runs in", "mask now", "plan", "why"]]
    for t in doc["threads"]:
        runs = ",".join(f"{k}" + ("" if v >= 0.995 else f" {100 * v:.0f}%")
                        for k, v in t["runs_in"].items())
        plan = (f"-> {t['new_mask']} ({t['domain']})" if t["new_mask"] else
                "stays" if t["action"] in ("stay", "fixed") else "left alone")
        use = "-" if t["cpu_use"] is None else f"{t['cpu_use']:.2f}"
        dem = "-" if t["runnable"] is None else f"{t['runnable']:.2f}"
        rows.append([str(t["tid"]), t["comm"], use, dem, runs, t["mask"], plan, t["why"]])
    lines.append("")
    lines += render_table(rows, left=2)
    pr, mb = doc["predicted"], doc["measured_before"]
    lines.append("")
    lines.append(f"cross-domain share of the sharing: predicted {pct(pr['cross_share_before'])} "
                 f"now, {pct(pr['cross_share_after'])} with the plan; measured in the window: "
                 + (pct(mb["share"]) + " of the accesses to shared regions came from outside "
                    "their main domain" if mb["share"] is not None else f"- ({mb['why']})"))
    loads = ", ".join(f"{k} {v['before']:.2f} -> {v['after']:.2f}" for k, v in doc["loads"].items())
    lines.append(f"CPU use per domain (now -> with the plan): {loads}")
    lines += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def apply_text(res: affinity.Result, dry_run: bool) -> str:
    lines = [""]
    if dry_run:
        lines.append(f"dry run: would set {res.count('would-set')} mask(s); nothing was changed")
    elif not res.outcomes:
        lines.append("applied: nothing to change (the plan moves no thread)")
    else:
        lines.append(f"applied: {res.count('set')} mask(s) set, {res.count('unchanged')} already "
                     f"right" + (f"; undo record: {res.undo_path} (restore: udamon place --undo "
                                 f"{res.undo_path})" if res.count("set") else
                                 "; nothing was changed"))
    for o in res.outcomes:
        if o.status in ("set", "would-set"):
            lines.append(f"  {o.tid} {o.comm}: {affinity.format_cpulist(o.previous or [])} -> "
                         f"{affinity.format_cpulist(o.mask or [])}" + (f" ({o.detail})" if o.detail
                                                                       else ""))
        elif o.status != "unchanged":
            lines.append(f"  {o.tid} {o.comm}: {o.status}: {o.detail}")
    for tid, comm in res.appeared:
        lines.append(f"  {tid} {comm}: appeared since the plan: not touched")
    return "\n".join(lines) + "\n"


def check_text(doc: dict) -> str:
    from udamon.report.common import render_table

    pct = placement.pct
    b, c = doc["measured_before"], doc["check"]["measured_after"]
    pr = doc["predicted"]
    rows = [["cross-domain share of sharing", "before", "after"],
            ["measured (accesses to shared regions)", pct(b["share"]), pct(c["share"])],
            ["predicted (pair weight)", pct(pr["cross_share_before"]),
             pct(pr["cross_share_after"])],
            ["snapshots with shared regions", f"{b['snapshots_with_sharing']}/{b['snapshots']}",
             f"{c['snapshots_with_sharing']}/{c['snapshots']}"]]
    lines = render_table(rows)
    if c["share"] is None:
        lines.append(f"  the check window saw no sharing to measure ({c['why']}); a longer "
                     "--check-duration gives the primitive more time")
    elif b["share"]:
        lines.append(f"  after / before: {c['share'] / b['share']:.2f}")
    return "\n".join(lines) + "\n"


# -- undo -------------------------------------------------------------------------


def _undo(a: argparse.Namespace) -> int:
    if a.apply or a.plan or a.input or a.pid:
        raise UsageError("--undo FILE restores masks: it takes no --apply, --plan, -i or --pid")
    res = affinity.undo(a.undo, force=a.force, dry_run=a.dry_run)
    if a.format == "json":
        json.dump(res.to_dict() | {"dry_run": a.dry_run}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        verb = "would restore" if a.dry_run else "restored"
        n = res.count("would-restore" if a.dry_run else "restored")
        lines = [f"udamon place --undo {a.undo}: {verb} {n} mask(s)"]
        for o in res.outcomes:
            if o.status in ("restored", "would-restore"):
                lines.append(f"  {o.tid} {o.comm}: {format_cpulist(o.previous or [])} -> "
                             f"{format_cpulist(o.mask or [])}")
            else:
                lines.append(f"  {o.tid} {o.comm}: {o.status}: {o.detail}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 1 if res.failed else 0
