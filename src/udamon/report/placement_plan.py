"""udamon place's plan document (what is saved with --save-plan and printed with
--format json) and its text: the plan, the apply outcome, the check window beside the
first one, the undo outcome.  The planning is udamon.schemes.placement, the masks are
set by udamon.schemes.affinity."""

from __future__ import annotations

import json
import re
import time

from udamon.errors import InputError, UsageError
from udamon.report.common import render_table
from udamon.report.placement import CrossMeasure
from udamon.schemes import affinity, placement
from udamon.targets import threads as thr
from udamon.targets.topology import Domain, Topology, format_cpulist, parse_cpulist
from udamon.units import fmt_size

PLAN_FORMAT = "udamon-place-plan"
PLAN_VERSION = 1


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


def plan_doc(pid: int, p: placement.Plan, before: CrossMeasure, window: dict) -> dict:
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


def saved_topology(d: dict) -> Topology:
    doms = tuple(Domain(int(x["id"]), tuple(int(c) for c in x["cpus"]),
                        tuple(int(n) for n in x.get("nodes", [])),
                        re.sub(r"\d+$", "", str(x.get("name", "llc"))) or "llc")
                 for x in d["domains"])
    return Topology(tuple(parse_cpulist(d["cpus"])), doms,
                    {int(n): tuple(parse_cpulist(c)) for n, c in d.get("nodes", {}).items()},
                    str(d.get("level", "?")), str(d.get("source", "saved plan")))


def load_plan(path: str) -> tuple[dict, Topology]:
    """A plan saved with --save-plan, checked (InputError when it is not one)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise InputError(f"{path}: not a plan saved by 'udamon place --save-plan'")
    if doc.get("version") != PLAN_VERSION:
        raise InputError(f"{path}: plan version {doc.get('version')!r} is not supported")
    try:
        int(doc["pid"])
        for t in doc["threads"]:
            int(t["tid"])
            int(t["starttime"])
            parse_cpulist(t["mask"])
            if t.get("new_mask"):
                parse_cpulist(t["new_mask"])
        topo = saved_topology(doc["topology"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed plan ({type(e).__name__}: {e})") from None
    return doc, topo


def save_plan(path: str, doc: dict) -> None:
    try:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def plan_text(doc: dict) -> str:
    pct = placement.pct
    w = doc["window"]
    src = (f"a {w['duration_s']:g} s monitoring window ({w['primitive']}, {w['snapshots']} "
           "snapshots)" if w["source"] == "live" else
           f"record {w['record']} ({w['primitive']}, {w['snapshots']} snapshots)")
    topo = saved_topology(doc["topology"])
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


def undo_text(res: affinity.Result, path: str, dry_run: bool) -> str:
    verb = "would restore" if dry_run else "restored"
    n = res.count("would-restore" if dry_run else "restored")
    lines = [f"udamon place --undo {path}: {verb} {n} mask(s)"]
    for o in res.outcomes:
        if o.status in ("restored", "would-restore"):
            lines.append(f"  {o.tid} {o.comm}: {format_cpulist(o.previous or [])} -> "
                         f"{format_cpulist(o.mask or [])}")
        else:
            lines.append(f"  {o.tid} {o.comm}: {o.status}: {o.detail}")
    return "\n".join(lines) + "\n"


def one_domain_reason(topo: Topology) -> str:
    return (f"this machine has one {topo.level} domain (CPUs {format_cpulist(topo.cpus)}): "
            "every thread shares the same last-level cache, so placement cannot reduce "
            "cross-domain sharing; nothing to do")
