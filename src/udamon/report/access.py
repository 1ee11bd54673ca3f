"""``report access``: the regions table of a record, with per-probe columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.core.monitor import Snapshot
from udamon.core.names import cut_at_spans, join_names, probe_label, union_tables
from udamon.probes.filters import conditions_text
from udamon.record.reader import Record
from udamon.report.common import (
    NO_NAMES_NOTE,
    atom_values,
    atoms,
    pick_columns,
    render_table,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_duration_ns, fmt_size

SORT_KEYS = ("address", "size", "nr_accesses", "age")
# start, end, size, nr_acc, rate and age, as the table prints them
BASE_COLUMNS_WIDTH = 66
MAPPING_COLUMN_WIDTH = 22  # what a short mapping name usually takes


@dataclass
class AccessOptions:
    snapshot: str = "last"  # last, all, busiest, sum, or an index (negative from the end)
    sort: str = "address"  # a SORT_KEYS entry or "probe:NAME"
    pid: int | None = None
    top: int | None = None
    columns: list[str] | None = None  # probe columns to show: names or globs (thread:*)
    wide: bool = False  # every probe column, however wide the table gets
    width: int = 120  # otherwise the probe columns that fit in this many characters


def select_snapshots(rec: Record, opts: AccessOptions) -> dict[int, list[tuple[int, Snapshot]]]:
    """Per pid: (index within that pid's snapshots, snapshot) pairs to show; index -1 is
    the sum of all of them."""
    out: dict[int, list[tuple[int, Snapshot]]] = {}
    pids = [opts.pid] if opts.pid is not None else rec.pids
    for pid in pids:
        snaps = rec.snapshots_of(pid)
        if not snaps:
            out[pid] = []
            continue
        if opts.snapshot == "all":
            out[pid] = list(enumerate(snaps))
        elif opts.snapshot == "last":
            out[pid] = [(len(snaps) - 1, snaps[-1])]
        elif opts.snapshot == "sum":
            out[pid] = [(-1, summed(snaps))]
        elif opts.snapshot == "busiest":
            i = max(range(len(snaps)), key=lambda j: (snaps[j].nr_reports, j))
            out[pid] = [(i, snaps[i])]
        else:
            i = int(opts.snapshot)
            j = i if i >= 0 else len(snaps) + i
            if not 0 <= j < len(snaps):
                raise IndexError(f"snapshot {i} does not exist for pid {pid} "
                                 f"(it has {len(snaps)}: 0..{len(snaps) - 1})")
            out[pid] = [(j, snaps[j])]
    return out


def summed(snaps: list[Snapshot]) -> Snapshot:
    """One table for the whole record: nr_accesses and probe hits summed over all
    snapshots, on the finest cut of their region boundaries (adjacent pieces with
    equal sums joined, unless they are in different mappings).  Bursty primitives
    (hint) leave most snapshots empty, so any single one says little; the sum shows
    where the accesses were and who made them.
    Its "rate" is over the whole record; "age" is the last snapshot's, in aggregation
    intervals (``age_unit_us``), never summed."""
    last = snaps[-1]
    lo, hi = atoms(snaps)
    table = union_tables([s.names for s in snaps])
    lo, hi, where = cut_at_spans(lo, hi, table or [])  # one mapping per row when named
    names = list(last.probe_hits)
    cols = np.zeros((1 + len(names), lo.size))
    for s in snaps:
        cols[0] += np.nan_to_num(atom_values(s, s.nr_accesses, lo))
        for k, n in enumerate(names, 1):
            cols[k] += np.nan_to_num(atom_values(s, s.probe_hits[n], lo))
    age = np.nan_to_num(atom_values(last, last.age, lo))
    if lo.size:
        new = np.ones(lo.size, dtype=bool)
        new[1:] = ((lo[1:] != hi[:-1]) | np.any(cols[:, 1:] != cols[:, :-1], axis=0)
                   | (where[1:] != where[:-1]))
        first = np.flatnonzero(new)
        lst = np.append(first[1:] - 1, lo.size - 1)
        lo, hi, cols, age = lo[first], hi[lst], cols[:, first], age[lst]
    c = cols.astype(np.int64)
    return Snapshot(last.time_ns, snaps[0].start_ns, last.pid, last.sample_us, lo, hi, c[0],
                    age.astype(np.int64), {n: c[k] for k, n in enumerate(names, 1)},
                    sum(s.nr_reports for s in snaps), sum(s.nr_passed for s in snaps),
                    mapped=last.mapped, mergeable=last.mergeable, names=table,
                    threads=last.threads)


def order(snap: Snapshot, key: str) -> np.ndarray:
    if key == "address":
        return np.arange(snap.start.size)
    if key == "size":
        v = (snap.end - snap.start).astype(np.float64)
    elif key == "nr_accesses":
        v = snap.nr_accesses.astype(np.float64)
    elif key == "age":
        v = snap.age.astype(np.float64)
    else:
        v = snap.probe_hits[key.removeprefix("probe:")].astype(np.float64)
    return np.lexsort((snap.start, -v))


def age_unit_us(snaps: list[Snapshot]) -> int:
    """The aggregation interval a summed table's ages count in: the last full one (the
    summed snapshot spans the whole record, and a session's last snapshot may be cut
    short)."""
    return max(s.aggr_us for s in snaps[-2:])


def rows(snap: Snapshot, key: str, top: int | None, age_us: int | None = None) -> list[dict]:
    """``age_us``: for a summed snapshot (whose own interval is the whole record), the
    aggregation interval ``age`` counts in; its ages are then capped at the record's
    span."""
    aggr_samples = max(snap.aggr_us * 1000 // max(snap.sample_us * 1000, 1), 1)
    cap = None if age_us is None else snap.aggr_us * 1000
    age_us = snap.aggr_us if age_us is None else age_us
    idx = order(snap, key)
    if top is not None:
        idx = idx[:top]
    maps = snap.region_mappings()
    out = []
    for i in idx.tolist():
        s, e = int(snap.start[i]), int(snap.end[i])
        out.append({
            "start": s, "end": e, "size": e - s,
            # the mappings it overlaps (None: the record has no names, e.g. replay)
            "mapping": None if maps is None else join_names(maps[i]),
            "mappings": None if maps is None else maps[i],
            "nr_accesses": int(snap.nr_accesses[i]),
            "access_rate": float(snap.nr_accesses[i]) / aggr_samples,
            "age": int(snap.age[i]),
            "age_ns": (int(snap.age[i]) * age_us * 1000 if cap is None
                       else min(int(snap.age[i]) * age_us * 1000, cap)),
            "probes": {n: int(h[i]) for n, h in snap.probe_hits.items()},
        })
    return out


def _age_us(rec: Record, pid: int, i: int, s: Snapshot) -> int | None:
    return age_unit_us(rec.snapshots_of(pid)) if i < 0 else None


def to_json(rec: Record, opts: AccessOptions) -> dict:
    t0 = rec.snapshots[0].start_ns if rec.snapshots else 0
    targets = []
    for pid, chosen in select_snapshots(rec, opts).items():
        targets.append({"pid": pid, "threads": {
            str(k): v for k, v in sorted(rec.thread_names(pid).items())}, "snapshots": [
            {"index": i, "time_ns": s.time_ns, "elapsed_ns": s.time_ns - t0,
             "sample_us": s.sample_us, "aggr_us": s.aggr_us, "nr_reports": s.nr_reports,
             "regions": rows(s, opts.sort, opts.top, _age_us(rec, pid, i, s))}
            for i, s in chosen]})
    return {"record": rec.path, "primitive": rec.header.get("primitive"),
            "coverage": rec.coverage, "complete": rec.complete, "end": rec.end,
            "filters": [f.to_dict() for f in rec.filters],
            "probes": [p.to_dict() for p in rec.probes], "targets": targets}


def to_text(rec: Record, opts: AccessOptions) -> str:
    a = rec.attrs
    lines = [f"record {rec.path}: primitive {rec.header.get('primitive')} "
             f"(coverage {rec.coverage}), sample {fmt_duration_ns(a.sample_us * 1000)}, "
             f"aggr {fmt_duration_ns(a.aggr_us * 1000)}, {len(rec.snapshots)} snapshots"]
    if rec.filters:
        lines.append(f"sample filters: {conditions_text(rec.filters)}  ("
                     + "; ".join(f.describe() for f in rec.filters) + ")")
    else:
        lines.append("sample filters: none (every report counts)")
    threads = rec.thread_names()
    for p in rec.probes:
        lines.append(f"probe {probe_label(p.name, threads)}: "
                     f"{conditions_text(p.filters) or 'every report'}")
    named = rec.has_names
    if not named:
        lines.append(NO_NAMES_NOTE)
    if rec.coverage == "unknown":
        lines.append("note: this primitive does not control what it samples; a region with "
                     "nr_accesses 0 was not observed, which is not the same as not accessed")
    t0 = rec.snapshots[0].start_ns if rec.snapshots else 0
    names, hidden = pick_columns(rec.probe_names, opts.columns, opts.wide,
                                 opts.width - BASE_COLUMNS_WIDTH
                                 - (MAPPING_COLUMN_WIDTH if named else 0),
                                 label=lambda n: probe_label(n, threads))
    if hidden and not opts.columns:
        lines.append(f"columns: {len(names)} of {len(rec.probe_names)} probes fit in "
                     f"{opts.width}; --columns 'thread:*' picks, --wide shows all")
    for pid, chosen in select_snapshots(rec, opts).items():
        tname = next((t.get("name", "") for t in rec.header.get("targets", [])
                      if t.get("pid") == pid), "")
        if not chosen:
            lines.append(f"\ntarget {pid} {tname}: no snapshots")
            continue
        for i, s in chosen:
            what = (f"sum of {len(rec.snapshots_of(pid))} snapshots up to" if i < 0
                    else f"snapshot {i} at")
            span = (f"over {fmt_duration_ns(s.aggr_us * 1000)}; rate over the whole span, "
                    "age as of the last snapshot" if i < 0
                    else f"aggr {fmt_duration_ns(s.aggr_us * 1000)}")
            lines.append(f"\ntarget {pid} {tname}  {what} "
                         f"{fmt_duration_ns(s.time_ns - t0)} ({span}), {s.nr_reports} reports, "
                         f"{len(s.start)} regions, {fmt_size(int((s.end - s.start).sum()))}")
            labels = [probe_label(n, s.threads or threads) for n in names]
            header = ["start", "end", *(["mapping"] if named else []), "size", "nr_acc",
                      "rate", "age", *labels]
            table = [header]
            for r in rows(s, opts.sort, opts.top, _age_us(rec, pid, i, s)):
                where = ([join_names(r["mappings"], short=True)
                          if r["mappings"] is not None else "?"] if named else [])
                table.append([f"{r['start']:#x}", f"{r['end']:#x}", *where,
                              fmt_size(r["size"]),
                              str(r["nr_accesses"]), f"{r['access_rate'] * 100:.0f}%",
                              fmt_duration_ns(r["age_ns"]),
                              *[str(r["probes"][n]) for n in names]])
            lines.extend(render_table(table, left=3 if named else 2))
    if rec.end is not None:
        e = rec.end
        tail = f"\nend: {e['reason']}, dropped reports {e['dropped_reports']}, " \
               f"lost samples {e['lost_samples']}"
        lines.append(tail)
    else:
        lines.append("\nend: the record is incomplete (no end line): udamon was stopped "
                     "before it finished")
    if rec.damage:
        lines.append(f"damaged: {rec.damage}")
    return "\n".join(lines) + "\n"


# -- the kind ---------------------------------------------------------------------


def _compute(rec: Record, o: AccessOptions):
    return select_snapshots(rec, o)  # IndexError: no such snapshot


KIND = ReportKind("access", "regions table: nr_accesses, age and per-probe hits of each region",
                  ("text", "json"), AccessOptions, _compute,
                  lambda rec, res, o: to_text(rec, o), lambda rec, res, o: to_json(rec, o))
