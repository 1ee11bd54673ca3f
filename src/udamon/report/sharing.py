"""``report sharing``: which CPUs and threads access the same memory.

From the ``cpu:<n>`` and ``thread:<tid>`` probes: in a snapshot a region is
shared by a and b when both probes have hits > 0 in it.  The matrices give the
bytes shared per snapshot, averaged over the target's snapshots (the diagonal:
bytes each one accessed).  With a write probe the shared bytes are split into
"written" (someone wrote the region in that snapshot: coherence traffic) and
read-only.  Region granularity: two threads touching different pages of one
region count as sharing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from udamon.core.names import thread_label
from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report.common import (
    breakdown,
    notes,
    pick_pid,
    record_line,
    render_table,
    rw_probe,
    target_name,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_size


@dataclass
class Matrix:
    kind: str  # "cpu" or "thread"
    ids: list[int]
    total: np.ndarray  # mean bytes shared per snapshot
    written: np.ndarray | None  # ... of which in regions written in that snapshot


@dataclass
class SharingResult:
    pid: int
    snapshots: int
    write_src: str | None
    matrices: list[Matrix]
    pairs: list[tuple[int, int, float]]  # threads, most shared first
    groups: list[list[int]]
    ngroups: int


def _matrix(rec: Record, snaps, kind: str, ids: dict[int, str], wsrc: str | None) -> Matrix:
    k = len(ids)
    tot = np.zeros((k, k))
    wr = np.zeros((k, k)) if wsrc is not None else None
    names = list(ids.values())
    for s in snaps:
        size = (s.end - s.start).astype(np.float64)
        h = np.stack([s.probe_hits[n] > 0 for n in names]).astype(np.float64)
        tot += (h * size) @ h.T
        if wr is not None:
            ws = size * (s.probe_hits[wsrc] > 0)
            wr += (h * ws) @ h.T
    n = max(len(snaps), 1)
    return Matrix(kind, list(ids), tot / n, None if wr is None else wr / n)


def group_threads(ids: list[int], shared: np.ndarray, ngroups: int) -> list[list[int]]:
    """Greedy: join the most-sharing pairs while groups stay within ceil(T/N)
    threads, then join the groups that share most until N are left."""
    t = len(ids)
    if t == 0:
        return []
    ngroups = min(ngroups, t)
    cap = math.ceil(t / ngroups)
    group = list(range(t))  # thread index -> group id
    order = sorted(((shared[i, j], i, j) for i in range(t) for j in range(i + 1, t)),
                   key=lambda x: (-x[0], x[1], x[2]))

    def members(g: int) -> list[int]:
        return [i for i in range(t) if group[i] == g]

    def ngr() -> int:
        return len(set(group))

    for v, i, j in order:
        if ngr() <= ngroups or v <= 0:
            break
        gi, gj = group[i], group[j]
        if gi != gj and len(members(gi)) + len(members(gj)) <= cap:
            group = [gi if g == gj else g for g in group]
    while ngr() > ngroups:
        gs = sorted(set(group))
        best = None
        for x in range(len(gs)):
            for y in range(x + 1, len(gs)):
                a, b = members(gs[x]), members(gs[y])
                if len(a) + len(b) > cap:
                    continue
                v = float(shared[np.ix_(a, b)].sum())
                if best is None or v > best[0]:
                    best = (v, gs[x], gs[y])
        if best is None:  # nothing fits the cap: join the two smallest
            small = sorted(gs, key=lambda g: (len(members(g)), g))[:2]
            best = (0.0, small[0], small[1])
        _, gx, gy = best
        group = [gx if g == gy else g for g in group]
    out = [sorted(ids[i] for i in members(g)) for g in sorted(set(group))]
    return sorted(out, key=lambda m: m[0])


def compute(rec: Record, pid: int | None, ngroups: int | None) -> SharingResult:
    cpus, threads = breakdown(rec, "cpu"), breakdown(rec, "thread")
    if len(cpus) < 2 and len(threads) < 2:
        raise UsageError(f"{rec.path} has no per-CPU or per-thread probes to compare: record "
                         "with --breakdown cpu / --breakdown thread (or probes named cpu:<n> "
                         "/ thread:<tid>), at least two of a kind")
    p = pick_pid(rec, pid)
    snaps = rec.snapshots_of(p)
    wsrc = rw_probe(rec, "write")
    mats = [_matrix(rec, snaps, kind, ids, wsrc)
            for kind, ids in (("cpu", cpus), ("thread", threads)) if len(ids) >= 2]
    n = ngroups or max(len(breakdown(rec, "node")), 2)
    pairs: list[tuple[int, int, float]] = []
    groups: list[list[int]] = []
    tm = next((m for m in mats if m.kind == "thread"), None)
    if tm is not None:
        k = len(tm.ids)
        pairs = sorted(((tm.ids[i], tm.ids[j], float(tm.total[i, j]))
                        for i in range(k) for j in range(i + 1, k)),
                       key=lambda x: (-x[2], x[0], x[1]))
        groups = group_threads(tm.ids, tm.total, n)
    return SharingResult(p, len(snaps), wsrc, mats, pairs, groups, n)


def _mat_json(m: np.ndarray | None) -> list[list[float]] | None:
    return None if m is None else [[round(float(v), 1) for v in row] for row in m]


def _labels(rec: Record, res: SharingResult, kind: str, ids: list[int]) -> list[str]:
    """``tid (comm)`` for threads (the tid alone when its name is not known)."""
    if kind != "thread":
        return [str(i) for i in ids]
    names = rec.thread_names(res.pid) or rec.thread_names()
    return [thread_label(i, names) for i in ids]


def to_json(rec: Record, res: SharingResult) -> dict:
    names = rec.thread_names(res.pid) or rec.thread_names()
    shown = {t for m in res.matrices if m.kind == "thread" for t in m.ids}
    return {
        "record": rec.path, "pid": res.pid, "coverage": rec.coverage,
        "snapshots": res.snapshots, "unit": "bytes per snapshot (mean)",
        "write_probe": res.write_src,
        # the names of the threads shown (a thread that exited before its name could
        # be read has none)
        "thread_names": {str(t): names[t] for t in sorted(shown) if t in names},
        "matrices": [{"kind": m.kind, "ids": m.ids, "labels": _labels(rec, res, m.kind, m.ids),
                      "shared": _mat_json(m.total),
                      "shared_written": _mat_json(m.written),
                      "shared_read_only": _mat_json(None if m.written is None
                                                    else m.total - m.written)}
                     for m in res.matrices],
        "thread_pairs": [{"a": a, "b": b, "shared": round(v, 1)} for a, b, v in res.pairs],
        "groups": res.groups, "ngroups": res.ngroups,
    }


def _mat_text(title: str, kind: str, labels: list[str], m: np.ndarray) -> list[str]:
    lines = [f"  {title}"]
    head = [kind] + labels
    table = [head] + [[labels[r]] + [fmt_size(v) for v in m[r]] for r in range(len(labels))]
    return lines + render_table(table, left=1, indent="    ")


def to_text(rec: Record, res: SharingResult, top: int = 10) -> str:
    lines = [record_line(rec)]
    lines.append(f"sharing in target {res.pid} {target_name(rec, res.pid)}: bytes of regions "
                 f"both accessed in a snapshot, mean over {res.snapshots} snapshots "
                 "(diagonal: bytes each accessed)")
    lines += notes(rec)
    if res.write_src is None:
        lines.append("no write probe: shared bytes are not split into written / read-only")
    names = rec.thread_names(res.pid) or rec.thread_names()
    for m in res.matrices:
        what = "CPUs" if m.kind == "cpu" else "threads"
        labels = _labels(rec, res, m.kind, m.ids)
        lines.append("")
        lines += _mat_text(f"{what}: shared bytes", m.kind, labels, m.total)
        if m.written is not None:
            lines += _mat_text(f"{what}: shared bytes in regions written (probe "
                               f"{res.write_src})", m.kind, labels, m.written)
            lines += _mat_text(f"{what}: shared bytes in regions only read", m.kind, labels,
                               m.total - m.written)
    if res.pairs:
        lines.append("\nthread pairs, most shared first:")
        table = [["threads", "shared"]]
        for a, b, v in res.pairs[:top]:
            table.append([f"{thread_label(a, names)} + {thread_label(b, names)}",
                          fmt_size(v)])
        lines += render_table(table, left=1)
        tm = next(m for m in res.matrices if m.kind == "thread")
        idx = {t: i for i, t in enumerate(tm.ids)}
        lines.append(f"\nsuggested placement: {res.ngroups} groups (one per node / LLC); "
                     "threads of a group should run on the same node:")
        inside = 0.0
        for g, members in enumerate(res.groups):
            ii = [idx[t] for t in members]
            sub = tm.total[np.ix_(ii, ii)]
            v = float(sub.sum() - np.trace(sub)) / 2
            inside += v
            lines.append(f"  group {g}: threads "
                         f"{', '.join(thread_label(x, names) for x in members)}  "
                         f"(shared inside: {fmt_size(v)})")
        total = sum(v for _, _, v in res.pairs)
        lines.append(f"  shared across groups: {fmt_size(max(total - inside, 0.0))} of "
                     f"{fmt_size(total)}")
    return "\n".join(lines) + "\n"


# -- the kind ---------------------------------------------------------------------


@dataclass
class SharingOptions:
    pid: int | None = None
    top: int | None = None
    groups: int | None = None  # thread groups to suggest (default: node probes, >= 2)


KIND = ReportKind("sharing", "bytes shared between CPUs and threads, thread grouping "
                  "suggestions", ("text", "json"), SharingOptions,
                  lambda rec, o: compute(rec, o.pid, o.groups),
                  lambda rec, res, o: to_text(rec, res, o.top or 10),
                  lambda rec, res, o: to_json(rec, res))
