"""``report wss``: working set size over time and its distribution.

The working set of a snapshot is the bytes of the regions whose count
(nr_accesses, or a probe's hits) is at least ``min_accesses``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.record.reader import Record
from udamon.report.common import (
    bar,
    describe_source,
    mapped_in,
    mapped_total,
    notes,
    percentiles,
    pick_pids,
    record_line,
    render_table,
    t0_of,
    target_name,
    values,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_duration_ns, fmt_size

PERCENTILES = (0, 25, 50, 75, 90, 99, 100)


@dataclass
class TargetWss:
    pid: int
    elapsed_ns: np.ndarray  # end of each snapshot, since the record start
    wss: np.ndarray  # bytes, per snapshot
    mapped: np.ndarray  # mapped bytes (all regions' bytes when unknown), per snapshot
    aggr_ns: np.ndarray  # length of each snapshot's aggregation interval


@dataclass
class WssResult:
    probe: str | None
    min_accesses: int
    targets: list[TargetWss]


def compute(rec: Record, pid: int | None, probe: str | None, min_accesses: int) -> WssResult:
    t0 = t0_of(rec)
    out = []
    for p in pick_pids(rec, pid):
        snaps = rec.snapshots_of(p)
        # a region's bytes that are really mapped (the three regions span holes)
        sizes = [mapped_in(s, s.start, s.end) for s in snaps]
        out.append(TargetWss(
            p, np.array([s.time_ns - t0 for s in snaps], dtype=np.int64),
            np.array([float(sz[values(s, probe) >= min_accesses].sum())
                      for s, sz in zip(snaps, sizes, strict=True)]),
            np.array([mapped_total(s) for s in snaps]),
            np.array([s.time_ns - s.start_ns for s in snaps], dtype=np.int64)))
    return WssResult(probe, min_accesses, out)


def time_slices(t: TargetWss, resol_time: int) -> list[tuple[int, float | None]]:
    """(slice end, mean wss of the snapshots ending in it, None if none) for at most
    ``resol_time`` slices of one width, a whole number of aggregation intervals:
    splitting by snapshot count instead would make slices of unequal length."""
    if t.elapsed_ns.size == 0:
        return []
    ends = t.elapsed_ns.astype(np.float64)
    aggr = float(np.median(t.aggr_ns)) if t.aggr_ns.size else 0.0
    begin = float(ends[0] - t.aggr_ns[0])
    span = max(float(ends[-1]) - begin, 1.0)
    aggr = aggr if aggr > 0 else span / t.elapsed_ns.size
    # slack of 1% of a slice: live snapshots end a little after each whole interval
    width = aggr * max(1, int(np.ceil(span / aggr / resol_time - 0.01)))
    n = max(1, int(np.ceil(span / width - 0.01)))
    idx = np.clip(np.ceil((ends - begin) / width - 0.01).astype(np.int64) - 1, 0, n - 1)
    out: list[tuple[int, float | None]] = []
    for j in range(n):
        sel = t.wss[idx == j]
        out.append((int(round(begin + (j + 1) * width)),
                    float(sel.mean()) if sel.size else None))
    return out


def to_json(rec: Record, res: WssResult) -> dict:
    return {
        "record": rec.path, "value": describe_source(res.probe), "coverage": rec.coverage,
        "min_accesses": res.min_accesses,
        "targets": [{
            "pid": t.pid,
            "percentiles": {str(p): v for p, v in zip(PERCENTILES, percentiles(
                t.wss, PERCENTILES), strict=True)},
            "mean": float(t.wss.mean()) if t.wss.size else 0.0,
            "series": [{"elapsed_ns": int(e), "wss": int(w), "mapped": int(m)}
                       for e, w, m in zip(t.elapsed_ns, t.wss, t.mapped, strict=True)],
        } for t in res.targets],
    }


def to_text(rec: Record, res: WssResult, resol_time: int = 20) -> str:
    lines = [record_line(rec)]
    lines.append(f"working set: bytes of regions with {describe_source(res.probe)} >= "
                 f"{res.min_accesses} per snapshot")
    lines += notes(rec)
    if rec.coverage == "unknown":
        lines.append("note: with unknown coverage this is the observed working set, a lower "
                     "bound")
    for t in res.targets:
        lines.append(f"\ntarget {t.pid} {target_name(rec, t.pid)}: {t.wss.size} snapshots, "
                     f"up to {fmt_size(t.mapped.max(initial=0))} mapped, mean wss "
                     f"{fmt_size(t.wss.mean() if t.wss.size else 0)}")
        top = max(float(t.wss.max(initial=0)), 1.0)
        lines.append("  distribution (percentile of snapshots):")
        table = [["%ile", "wss", ""]]
        for p, v in zip(PERCENTILES, percentiles(t.wss, PERCENTILES), strict=True):
            table.append([str(p), fmt_size(v), bar(v / top)])
        lines += render_table(table, left=0, indent="    ")
        lines.append("  over time (mean of the snapshots ending in each slice):")
        table = [["until", "wss", ""]]
        for until, v in time_slices(t, resol_time):
            table.append([fmt_duration_ns(until), "-" if v is None else fmt_size(v),
                          "" if v is None else bar(v / top)])
        lines += render_table(table, left=0, indent="    ")
    return "\n".join(lines) + "\n"


# -- the kind ---------------------------------------------------------------------


@dataclass
class WssOptions:
    pid: int | None = None
    probe: str | None = None  # the working set of this probe's hits (e.g. write)
    min_accesses: int = 1  # a region is in the working set when its count is >= this
    resol_time: int = 20  # rows of the over-time chart


KIND = ReportKind("wss", "working set size over time and its distribution", ("text", "json"),
                  WssOptions, lambda rec, o: compute(rec, o.pid, o.probe, o.min_accesses),
                  lambda rec, res, o: to_text(rec, res, o.resol_time),
                  lambda rec, res, o: to_json(rec, res))
