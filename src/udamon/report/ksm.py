"""``report ksm``: KSM merge candidates, memory that has not been written for long.

Write counts come from a write probe (``write``, or any probe whose filters are
exactly "write"), or from nr_accesses when the record's sample filters keep
only writes or its primitive (wp) sees only writes; then reads are unknown.
The address space is cut into atoms at every region boundary of every
snapshot (within an atom every snapshot has a single value), and each
atom's last written snapshot is tracked; the unwritten time is measured from
then (or from when the atom was first mapped) to the end of the record.
Adjacent candidate atoms are merged into ranges, ranked by size.  When the record
says what is mergeable (live targets: the snapshots' ``mergeable`` spans, private
anonymous memory), atoms are also cut at the last snapshot's span boundaries and only
those inside can be candidates: KSM merges only private anonymous pages, so file
mappings (program text, libraries, mapped files), shared memory, the [stack] and the
unmapped holes DAMON's three regions cover are never candidates.  Older records say
only what is mapped (``mapped``): then mapped memory is kept and the text says that
file-backed mappings may be among the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.core.names import join_names
from udamon.errors import ParameterError
from udamon.record.reader import Record
from udamon.report.common import (
    atom_values,
    atoms,
    describe_source,
    mapped_in,
    mapped_total,
    mappings_of,
    notes,
    pick_pids,
    read_source,
    reads_from,
    record_line,
    render_table,
    target_name,
    values,
    write_source,
    writes_from,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_duration_ns, fmt_size

DEFAULT_MIN_AGE_NS = 10_000_000_000


@dataclass
class Candidate:
    start: int
    end: int
    unwritten_ns: int  # at least this long without an observed write, up to the end
    never_written: bool  # no write seen in the whole record
    read_bytes: int  # bytes of it read (or accessed) while unwritten; -1 unknown


@dataclass
class TargetKsm:
    pid: int
    mapped: int  # bytes the candidates are taken from (mergeable, else mapped memory)
    length_ns: int
    min_age_ns: int
    candidates: list[Candidate]
    anonymous_only: bool = False  # the record said which memory is private anonymous
    mapped_known: bool = False  # the record said what is mapped (a live target)


@dataclass
class KsmResult:
    write_src: str | None  # probe name, None: nr_accesses of a write-only record
    read_src: str | None  # probe name, "nr_accesses" (any access), or None (unknown)
    targets: list[TargetKsm]


def compute(rec: Record, pid: int | None, min_age_ns: int | None) -> KsmResult:
    wsrc = write_source(rec, "report ksm")
    rsrc = read_source(rec)
    out = []
    for p in pick_pids(rec, pid):
        snaps = rec.snapshots_of(p)
        lo, hi = atoms(snaps)
        last = snaps[-1]
        if last.mergeable is not None:
            lo, hi = _atoms_in(lo, hi, last.mergeable)
        elif last.mapped is not None:
            lo, hi = _mapped_atoms(lo, hi, last)
        last_w = np.full(lo.size, -1, dtype=np.int64)
        last_r = np.full(lo.size, -1, dtype=np.int64)
        first = np.full(lo.size, -1, dtype=np.int64)
        for s in snaps:
            w = atom_values(s, values(s, wsrc), lo)
            mapped = np.isfinite(w)
            first[mapped & (first < 0)] = s.start_ns
            last_w[np.nan_to_num(w) > 0] = s.time_ns
            if rsrc is not None:
                r = atom_values(s, values(s, None if rsrc == "nr_accesses" else rsrc), lo)
                last_r[np.nan_to_num(r) > 0] = s.time_ns
        t_end = last.time_ns
        length = t_end - snaps[0].start_ns
        min_age = min_age_ns if min_age_ns is not None else min(DEFAULT_MIN_AGE_NS,
                                                                length // 2)
        since = np.where(last_w >= 0, last_w, first)
        unwritten = t_end - since
        cand = np.isfinite(atom_values(last, values(last, wsrc), lo)) & (unwritten >= min_age)
        read = last_r > since
        found: list[Candidate] = []
        for i in np.flatnonzero(cand).tolist():
            size = int(hi[i] - lo[i])
            rb = (size if read[i] else 0) if rsrc is not None else -1
            c = found[-1] if found else None
            if c is not None and c.end == int(lo[i]):
                c.end = int(hi[i])
                c.unwritten_ns = min(c.unwritten_ns, int(unwritten[i]))
                c.never_written = c.never_written and bool(last_w[i] < 0)
                c.read_bytes = -1 if rb < 0 else c.read_bytes + rb
            else:
                found.append(Candidate(int(lo[i]), int(hi[i]), int(unwritten[i]),
                                       bool(last_w[i] < 0), rb))
        found.sort(key=lambda c: (-(c.end - c.start), c.start))
        mapped = int(mapped_total(last) if last.mergeable is None
                     else sum(b - a for a, b in last.mergeable))
        out.append(TargetKsm(p, mapped, int(length), int(min_age), found,
                             anonymous_only=last.mergeable is not None,
                             mapped_known=last.mapped is not None))
    return KsmResult(wsrc, rsrc, out)


def _atoms_in(lo: np.ndarray, hi: np.ndarray, spans: list[tuple[int, int]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """The atoms cut at the spans' boundaries, keeping the pieces inside a span."""
    if not spans or lo.size == 0:
        return lo[:0], hi[:0]
    ss = np.asarray([a for a, _ in spans], dtype=np.uint64)
    se = np.asarray([b for _, b in spans], dtype=np.uint64)
    bounds = np.unique(np.concatenate((lo, hi, ss, se)))
    plo, phi = bounds[:-1], bounds[1:]
    i = np.searchsorted(lo, plo, side="right") - 1  # the atom holding each piece
    inside = i >= 0
    inside[inside] = plo[inside] < hi[i[inside]]
    j = np.searchsorted(ss, plo, side="right") - 1  # the span starting at or below it
    ok = j >= 0
    ok[ok] = phi[ok] <= se[j[ok]]
    keep = inside & ok
    return plo[keep], phi[keep]


def _mapped_atoms(lo: np.ndarray, hi: np.ndarray, snap) -> tuple[np.ndarray, np.ndarray]:
    """The atoms cut at ``snap``'s mapping boundaries, keeping the mapped pieces."""
    cuts = np.asarray([x for span in snap.mapped for x in span], dtype=np.uint64)
    bounds = np.unique(np.concatenate((lo, hi, cuts)))
    if bounds.size < 2:
        return lo[:0], hi[:0]
    plo, phi = bounds[:-1], bounds[1:]
    i = np.searchsorted(lo, plo, side="right") - 1  # the atom holding each piece
    inside = i >= 0
    inside[inside] = plo[inside] < hi[i[inside]]
    plo, phi = plo[inside], phi[inside]
    keep = mapped_in(snap, plo.astype(np.float64), phi.astype(np.float64)) > 0
    return plo[keep], phi[keep]


def _read_text(c: Candidate) -> str:
    if c.read_bytes < 0:
        return "unknown"
    if c.read_bytes == 0:
        return "no"
    if c.read_bytes >= c.end - c.start:
        return "yes"
    return f"partly ({fmt_size(c.read_bytes)})"


def _mappings(rec: Record, t: TargetKsm) -> list[list[str] | None]:
    got = mappings_of(rec, t.pid, [c.start for c in t.candidates],
                      [c.end for c in t.candidates])
    return got if got is not None else [None] * len(t.candidates)


def to_json(rec: Record, res: KsmResult) -> dict:
    return {
        "record": rec.path, "coverage": rec.coverage,
        "writes_from": describe_source(res.write_src),
        "reads_from": None if res.read_src is None else (
            "nr_accesses" if res.read_src == "nr_accesses" else f"probe {res.read_src}"),
        "targets": [{
            "pid": t.pid, "mapped": t.mapped, "anonymous_only": t.anonymous_only,
            "length_ns": t.length_ns,
            "min_age_ns": t.min_age_ns,
            "candidate_bytes": sum(c.end - c.start for c in t.candidates),
            "candidates": [{"start": c.start, "end": c.end, "size": c.end - c.start,
                            "mappings": m,
                            "unwritten_ns": c.unwritten_ns, "never_written": c.never_written,
                            "read_bytes": None if c.read_bytes < 0 else c.read_bytes,
                            # content is not in a region record: udamon ksm-advise sees it
                            "predicted_saving": None}
                           for c, m in zip(t.candidates, _mappings(rec, t), strict=True)],
        } for t in res.targets],
    }


def to_text(rec: Record, res: KsmResult, top: int = 20) -> str:
    lines = [record_line(rec)]
    lines.append("KSM candidates: memory without writes until the end of the record, "
                 "largest first")
    lines.append(f"writes from: {writes_from(rec, res.write_src)}; "
                 f"reads from: {reads_from(rec, res.read_src)}")
    lines += notes(rec)
    if rec.coverage == "unknown":
        lines.append("note: 'unwritten' means no write was observed; confirm before merging")
    for t in res.targets:
        total = sum(c.end - c.start for c in t.candidates)
        share = total / t.mapped * 100 if t.mapped else 0.0
        of = (" private anonymous memory" if t.anonymous_only else " mapped"
              if t.mapped_known else "")
        lines.append(f"\ntarget {t.pid} {target_name(rec, t.pid)}: "
                     f"{fmt_size(total)} of {fmt_size(t.mapped)}{of} ({share:.1f}%) not written "
                     f"for >= {fmt_duration_ns(t.min_age_ns)} (record "
                     f"{fmt_duration_ns(t.length_ns)}), {len(t.candidates)} range(s)")
        if not t.candidates:
            continue
        named = rec.has_names
        maps = _mappings(rec, t)
        table = [["start", "end", *(["mapping"] if named else []), "size", "unwritten for",
                  "read meanwhile"]]
        for c, m in list(zip(t.candidates, maps, strict=True))[:top]:
            age = fmt_duration_ns(c.unwritten_ns) + (" (never)" if c.never_written else "")
            where = [join_names(m, short=True) if m is not None else "?"] if named else []
            table.append([f"{c.start:#x}", f"{c.end:#x}", *where, fmt_size(c.end - c.start),
                          age, _read_text(c)])
        lines += render_table(table, left=3 if named else 2)
        if len(t.candidates) > top:
            lines.append(f"  ... {len(t.candidates) - top} more (--top N)")
    if any(t.mapped_known and not t.anonymous_only for t in res.targets):
        lines.append("\nnote: this record does not say which memory is private anonymous (the "
                     "only memory KSM merges): file-backed mappings and shared memory may be "
                     "among the candidates")
    lines.append("\n'(never)': no write in the whole record; the time is then since the range "
                 "was first seen")
    lines.append("this record has no page contents: what would really merge (and the saving) "
                 "is what 'udamon ksm-advise' tells")
    return "\n".join(lines) + "\n"


# -- the kind ---------------------------------------------------------------------


@dataclass
class KsmOptions:
    pid: int | None = None
    top: int | None = None
    min_age_ns: int | None = None  # unwritten at least this long (DAMON records)


def _compute(rec: Record, o: KsmOptions):
    """A record of ``udamon ksm-advise`` holds its advice; any other record is read
    for memory not written for long (by write counts, not content)."""
    from udamon.report import ksm_advice
    from udamon.report.common import pick_pids

    if not ksm_advice.is_advice_record(rec):
        return compute(rec, o.pid, o.min_age_ns)
    if o.min_age_ns is not None:
        raise ParameterError("min_age_ns", "{param}: a record of udamon ksm-advise holds the "
                             "advice made with its own minimum age")
    pick_pids(rec, o.pid)
    return ksm_advice.advice_from_record(rec, o.pid)


def _text(rec: Record, res, o: KsmOptions) -> str:
    from udamon.report import ksm_advice
    from udamon.report.common import record_line

    if isinstance(res, KsmResult):
        return to_text(rec, res, o.top or 20)
    return ksm_advice.to_text(res[0], [record_line(rec)], o.top or 20)


def _json(rec: Record, res, o: KsmOptions) -> dict:
    from udamon.report import ksm_advice

    if isinstance(res, KsmResult):
        return to_json(rec, res)
    adv, applied = res
    doc = ksm_advice.to_json(adv, rec.path)
    for t in doc["targets"]:
        if t["pid"] in applied:
            t["apply"] = applied[t["pid"]]
    return doc


KIND = ReportKind("ksm", "KSM candidates: memory not written for a long time (needs write "
                  "counts), or the advice of udamon ksm-advise", ("text", "json"), KsmOptions,
                  _compute, _text, _json)
