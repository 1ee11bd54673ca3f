"""Helpers shared by the reports: target and probe lookup, byte-exact resampling
of a snapshot's regions onto any address grid, a gap-compressing address axis,
and plain-text tables and bars.

Resampling is exact: a snapshot's per-region values are integrated over bytes
(``integrate``), so a bin that holds parts of several regions gets their
size-weighted mean, and unmapped bytes contribute nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from udamon.core.monitor import Snapshot
from udamon.core.names import region_mappings, union_tables
from udamon.errors import ParameterError, UsageError
from udamon.probes.filters import conditions_text, parse_conditions
from udamon.record.reader import Record
from udamon.units import fmt_duration_ns, fmt_size

UNKNOWN_COVERAGE_NOTE = (
    "note: coverage is unknown (the primitive does not control what it samples): "
    "0 means not observed, not 'not accessed'; values are counts of observed accesses, "
    "to be read as shares between origins rather than as access frequency")


# -- targets and probes ----------------------------------------------------------


def pick_pids(rec: Record, pid: int | None) -> list[int]:
    """The targets to report on: ``pid`` (validated) or all that have snapshots."""
    if pid is not None:
        if pid not in rec.pids:
            raise ParameterError("pid", "{param} {pid} is not a target of {path} "
                                 "(targets: {targets})", pid=pid, path=rec.path,
                                 targets=", ".join(map(str, rec.pids)) or "none")
        pids = [pid]
    else:
        pids = [p for p in rec.pids if rec.snapshots_of(p)]
    if not pids or not any(rec.snapshots_of(p) for p in pids):
        raise UsageError(f"{rec.path} has no snapshots"
                         + (f" for pid {pid}" if pid is not None else "") + " to report on")
    return pids


def pick_pid(rec: Record, pid: int | None) -> int:
    """One target: ``pid`` or the first one with snapshots."""
    return pick_pids(rec, pid)[0]


def target_name(rec: Record, pid: int) -> str:
    return next((str(t.get("name", "")) for t in rec.header.get("targets", [])
                 if t.get("pid") == pid), "")


def check_probe(rec: Record, name: str | None) -> str | None:
    if name is not None and name not in rec.probe_names:
        raise ParameterError("probe", "{param} {name!r} is not a probe of {path} "
                             "(probes: {probes})", name=name, path=rec.path,
                             probes=", ".join(rec.probe_names) or "none")
    return name


def values(snap: Snapshot, probe: str | None) -> np.ndarray:
    """Per-region counts: nr_accesses, or a probe's hits."""
    v = snap.nr_accesses if probe is None else snap.probe_hits[probe]
    return v.astype(np.float64)


def aggr_samples(snap: Snapshot) -> int:
    """Sampling intervals per aggregation interval (the maximum count)."""
    return max(int(round(snap.aggr_us / max(snap.sample_us, 1))), 1)


def breakdown(rec: Record, kind: str) -> dict[int, str]:
    """Automatic breakdown probes of a kind (cpu, node, thread): id -> probe name."""
    out = {}
    for name in rec.probe_names:
        m = re.fullmatch(rf"{kind}:(\d+)", name)
        if m:
            out[int(m.group(1))] = name
    return dict(sorted(out.items()))


def _same_filters(filters, conditions: str) -> bool:
    want = [f.to_dict() for f in parse_conditions(conditions)]
    return [f.to_dict() for f in filters] == want


def rw_probe(rec: Record, kind: str) -> str | None:
    """The probe counting all writes (kind "write") or all reads ("read"): the one
    with that name, else one whose filters are exactly that condition."""
    if kind in rec.probe_names:
        return kind
    for p in rec.probes:
        if _same_filters(p.filters, kind):
            return p.name
    return None


def write_only(rec: Record) -> bool:
    """nr_accesses counts exactly the writes (sample filters == only 'write')."""
    return bool(rec.filters) and _same_filters(rec.filters, "write")


def primitives(rec: Record) -> set[str]:
    """The primitive(s) that made the record: the header names one ("wp") or several
    ("hint,wp", or a list)."""
    p = rec.header.get("primitive")
    names = p if isinstance(p, list) else re.split(r"[,+\s]+", str(p or ""))
    return {str(n) for n in names if n}


def sees_only_writes(rec: Record) -> bool:
    """Every report of the record is a write: wp alone (uffd write-protect faults)."""
    return primitives(rec) == {"wp"}


def write_source(rec: Record, option: str) -> str | None:
    """Where write counts come from: a probe name, or None for nr_accesses of a
    write-only record or of a wp record (wp sees only writes, so with no sample
    filter other than 'write' its nr_accesses are the write samples).  UsageError
    when the record cannot tell writes apart."""
    name = rw_probe(rec, "write")
    if name is not None:
        return name
    if write_only(rec) or (sees_only_writes(rec) and not rec.filters):
        return None
    if sees_only_writes(rec):
        raise UsageError(f"{rec.path}: its nr_accesses count only the writes that pass the "
                         f"sample filters ({conditions_text(rec.filters)}), not all writes, "
                         f"which {option} needs: record with --breakdown rw or without "
                         "sample filters")
    raise UsageError(f"{rec.path} cannot tell writes apart, which {option} needs: record "
                     "with a 'write' probe (--probe write=write or --breakdown rw) or with "
                     "--write-only")


def read_source(rec: Record) -> str | None:
    """Where read counts come from: a read probe, "nr_accesses" (any access, the
    best there is without one), or None when reads cannot be known (write-only
    sample filters, or a primitive that sees only writes)."""
    if sees_only_writes(rec):
        return None
    name = rw_probe(rec, "read")
    if name is not None:
        return name
    return None if write_only(rec) else "nr_accesses"


def describe_source(probe: str | None) -> str:
    return "nr_accesses" if probe is None else f"probe {probe}"


def writes_from(rec: Record, src: str | None) -> str:
    """Where write counts come from, for people: says why nr_accesses are writes."""
    if src is not None:
        return f"probe {src}"
    if sees_only_writes(rec):
        return "nr_accesses (wp sees only writes)"
    return "nr_accesses (write-only sample filters)"


def reads_from(rec: Record, src: str | None) -> str:
    """Where read counts come from, for people; "unknown" says why."""
    if src is None:
        return ("unknown (wp sees only writes)" if sees_only_writes(rec) else
                "unknown (write-only record without a read probe)")
    if src == "nr_accesses":
        return "nr_accesses (any access: no read probe)"
    return f"probe {src}"


def record_line(rec: Record) -> str:
    a = rec.attrs
    return (f"record {rec.path}: primitive {rec.header.get('primitive')} "
            f"(coverage {rec.coverage}), sample {fmt_duration_ns(a.sample_us * 1000)}, "
            f"aggr {fmt_duration_ns(a.aggr_us * 1000)}, {len(rec.snapshots)} snapshots")


def notes(rec: Record) -> list[str]:
    out = []
    if rec.coverage == "unknown":
        out.append(UNKNOWN_COVERAGE_NOTE)
    if not rec.complete:
        out.append("note: the record is incomplete (no end line)")
    if rec.damage:
        out.append(f"note: damaged record, read as far as possible: {rec.damage}")
    return out


def t0_of(rec: Record) -> int:
    return min((s.start_ns for s in rec.snapshots), default=0)


# -- resampling -------------------------------------------------------------------


def integrate(snap: Snapshot, vals: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Integral over bytes of the per-region ``vals`` between consecutive ``edges``
    (sorted addresses, float64): one value per interval, len(edges) - 1."""
    edges = np.asarray(edges, dtype=np.float64)
    n = snap.start.size
    if n == 0:
        return np.zeros(max(edges.size - 1, 0))
    s = snap.start.astype(np.float64)
    e = snap.end.astype(np.float64)
    area = np.asarray(vals, dtype=np.float64) * (e - s)
    cum = np.concatenate(([0.0], np.cumsum(area)))
    xp = np.empty(2 * n)
    fp = np.empty(2 * n)
    xp[0::2], xp[1::2] = s, e
    fp[0::2], fp[1::2] = cum[:-1], cum[1:]
    f = np.interp(edges, xp, fp)  # F is continuous and flat over gaps
    return np.diff(f)


def onto_regions(snaps: Sequence[Snapshot], start: np.ndarray, end: np.ndarray,
                 fn) -> np.ndarray:
    """For each range [start[i], end[i]) (sorted, not overlapping): the sum over
    ``snaps`` of the byte-weighted mean of ``fn(snap)`` (per-region values) in it.
    Bytes a snapshot does not map count as 0."""
    s = np.asarray(start, dtype=np.float64)
    e = np.asarray(end, dtype=np.float64)
    edges = np.empty(2 * s.size)
    edges[0::2], edges[1::2] = s, e
    width = np.maximum(e - s, 1.0)
    total = np.zeros(s.size)
    for snap in snaps:
        total += integrate(snap, fn(snap), edges)[0::2] / width
    return total


def atoms(snaps: Sequence[Snapshot]) -> tuple[np.ndarray, np.ndarray]:
    """The elementary address ranges of a target: cut at every region boundary of
    every snapshot, keeping only ranges some snapshot maps.  Within one atom each
    snapshot has a single value."""
    bounds = np.unique(np.concatenate([np.concatenate((s.start, s.end)) for s in snaps]
                                      or [np.zeros(0, dtype=np.uint64)]))
    if bounds.size < 2:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    lo, hi = bounds[:-1], bounds[1:]
    mapped = np.zeros(lo.size, dtype=bool)
    for s in snaps:
        i = np.searchsorted(s.start, lo, side="right") - 1
        ok = i >= 0
        mapped[ok] |= lo[ok] < s.end[i[ok]]
    return lo[mapped], hi[mapped]


def mapped_in(snap: Snapshot, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Bytes of each ``[lo, hi)`` that the snapshot's mapped spans cover (``hi - lo``
    when the record does not say what is mapped, e.g. replay input).  DAMON's three
    regions include the holes between mappings; a report that says "memory" must
    not count them."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if snap.mapped is None:
        return hi - lo
    if not snap.mapped:
        return np.zeros(lo.size)
    ms = np.asarray([a for a, _ in snap.mapped], dtype=np.float64)
    me = np.asarray([b for _, b in snap.mapped], dtype=np.float64)
    below = np.concatenate(([0.0], np.cumsum(me - ms)))  # mapped bytes before span i

    def upto(x: np.ndarray) -> np.ndarray:  # mapped bytes below address x
        i = np.searchsorted(ms, x, side="right") - 1
        j = np.maximum(i, 0)
        part = np.clip(x - ms[j], 0.0, me[j] - ms[j])
        return np.where(i >= 0, below[j] + part, 0.0)

    return upto(hi) - upto(lo)


def mapped_total(snap: Snapshot) -> float:
    """The target's mapped bytes in this snapshot (its regions' bytes when unknown)."""
    if snap.mapped is not None:
        return float(sum(b - a for a, b in snap.mapped))
    return float((snap.end - snap.start).astype(np.float64).sum())


def atom_values(snap: Snapshot, vals: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Value of each atom (by its start address) in ``snap``; NaN where unmapped."""
    i = np.searchsorted(snap.start, lo, side="right") - 1
    out = np.full(lo.size, np.nan)
    ok = i >= 0
    ok[ok] = lo[ok] < snap.end[i[ok]]
    out[ok] = np.asarray(vals, dtype=np.float64)[i[ok]]
    return out


@dataclass
class AddrAxis:
    """The address span of a target's regions with large unmapped gaps cut out.

    ``segments`` are the kept address ranges, laid side by side; ``length`` is
    their total size (the axis length in bytes)."""

    segments: list[tuple[int, int]]

    @classmethod
    def of(cls, snaps: Sequence[Snapshot], gap_fraction: float = 0.02) -> AddrAxis:
        """Union of all snapshots' regions, or of their mapped spans when the record
        has them (the regions also cover the holes between mappings); gaps larger
        than ``gap_fraction`` of the mapped bytes are cut out, smaller ones stay
        (shown as unmapped)."""
        if any(s.mapped is not None for s in snaps):
            spans = sorted({(int(a), int(b)) for s in snaps for a, b in (s.mapped or [])})
        else:
            spans = sorted({(int(a), int(b)) for s in snaps
                            for a, b in zip(s.start.tolist(), s.end.tolist(), strict=True)})
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        mapped = sum(b - a for a, b in merged)
        keep = gap_fraction * mapped
        segs: list[list[int]] = []
        for a, b in merged:
            if segs and a - segs[-1][1] <= keep:
                segs[-1][1] = b
            else:
                segs.append([a, b])
        return cls([(a, b) for a, b in segs])

    @property
    def length(self) -> int:
        return sum(b - a for a, b in self.segments)

    @property
    def offsets(self) -> list[int]:
        out, o = [], 0
        for a, b in self.segments:
            out.append(o)
            o += b - a
        return out

    def gaps(self) -> list[tuple[int, int, int]]:
        """(axis position, gap start, gap end) of each cut-out gap."""
        offs = self.offsets
        return [(offs[i], self.segments[i - 1][1], self.segments[i][0])
                for i in range(1, len(self.segments))]

    def to_addr(self, pos) -> np.ndarray:
        """Axis positions (bytes from the axis start) -> addresses."""
        pos = np.asarray(pos, dtype=np.float64)
        offs = np.asarray(self.offsets, dtype=np.float64)
        starts = np.asarray([a for a, _ in self.segments], dtype=np.float64)
        i = np.clip(np.searchsorted(offs, pos, side="right") - 1, 0, len(offs) - 1)
        return starts[i] + (pos - offs[i])

    def edges(self, nbins: int) -> np.ndarray:
        """Axis positions of ``nbins`` equal bins' edges."""
        return np.linspace(0.0, float(self.length), nbins + 1)

    def resample(self, snap: Snapshot, vals: np.ndarray, nbins: int) -> np.ndarray:
        """Byte-weighted mean of ``vals`` in each bin; NaN where nothing is mapped."""
        pos = self.edges(nbins)
        out = np.zeros(nbins)
        cov = np.zeros(nbins)
        # Integrate piecewise per segment so a bin straddling a cut gap only
        # counts the mapped bytes on either side of it.
        for (a, b), off in zip(self.segments, self.offsets, strict=True):
            lo = np.clip(pos, off, off + (b - a))
            addr = a + (lo - off)
            out += integrate(snap, vals, addr)
            cov += integrate(snap, np.ones(snap.start.size), addr)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cov > 0, out / np.where(cov > 0, cov, 1), np.nan)


# -- text -------------------------------------------------------------------------


def render_table(rows: Sequence[Sequence[str]], left: int = 1, indent: str = "  ") -> list[str]:
    """Rows of cells (the first row is the header) as aligned lines: the first
    ``left`` columns left-aligned, the others right-aligned."""
    if not rows:
        return []
    ncol = max(len(r) for r in rows)
    rows = [list(r) + [""] * (ncol - len(r)) for r in rows]
    widths = [max(len(r[c]) for r in rows) for c in range(ncol)]
    return [indent + "  ".join(r[c].ljust(widths[c]) if c < left else r[c].rjust(widths[c])
                               for c in range(ncol)).rstrip() for r in rows]


def bar(frac: float, width: int = 40) -> str:
    """damo-style bar: ``|****      |``."""
    frac = 0.0 if not np.isfinite(frac) else min(max(frac, 0.0), 1.0)
    n = int(round(frac * width))
    return "|" + "*" * n + " " * (width - n) + "|"


def percentiles(v: np.ndarray, ps: Sequence[int]) -> list[float]:
    if v.size == 0:
        return [0.0 for _ in ps]
    return [float(x) for x in np.percentile(v, ps)]


def fmt_rate(bps: float) -> str:
    return f"{fmt_size(bps)}/s"


def fmt_pct(x: float) -> str:
    return f"{x * 100:.1f}%" if np.isfinite(x) else "-"


# -- names ------------------------------------------------------------------------


def mappings_of(rec: Record, pid: int, start, end, *, whole_record: bool = False
                ) -> list[list[str]] | None:
    """Per range [start[i], end[i]) of target ``pid``, the names of the mappings it
    overlaps (udamon.core.names.region_mappings) in the last snapshot's table, or in
    all the target's tables (``whole_record``: ranges that were mapped only for a
    while); None when the record has no names (replayed input)."""
    snaps = rec.snapshots_of(pid)
    table = (union_tables([s.names for s in snaps]) if whole_record
             else snaps[-1].names if snaps else None)
    if table is None:
        return None
    return region_mappings(table, np.asarray(start, dtype=np.uint64),
                           np.asarray(end, dtype=np.uint64))


NO_NAMES_NOTE = ("mapping names: not in this record (only live targets' /proc/PID/maps "
                 "say which mapping a region is in)")


# Which probe columns a table shows first when not all fit: the user's own probes, then
# the breakdowns' read/write, locality, nodes, CPUs and threads (the many), each in
# record order.
_COLUMN_PRIORITY = (("write", "read"), ("local", "remote"), ("node:",), ("cpu:",),
                    ("thread:",))


def pick_columns(names: Sequence[str], patterns: Sequence[str] | None, wide: bool,
                 room: int, label=str) -> tuple[list[str], int]:
    """The probe columns to show (in ``names``' order) and how many are left out:
    ``patterns`` (names or fnmatch globs such as ``thread:*``) picks them; ``wide``
    shows all; otherwise as many as fit in ``room`` characters (a column as wide as its
    ``label``), by _COLUMN_PRIORITY."""
    import fnmatch

    if patterns:
        shown = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return shown, len(names) - len(shown)
    if wide:
        return list(names), 0

    def rank(n: str) -> int:
        for i, group in enumerate(_COLUMN_PRIORITY):
            if any(n == g or (g.endswith(":") and n.startswith(g)) for g in group):
                return i + 1
        return 0

    chosen: set[str] = set()
    used = 0
    for n in sorted(names, key=rank):  # stable: record order within a rank
        w = max(len(label(n)), 5) + 2
        if used + w > room:
            break
        chosen.add(n)
        used += w
    return [n for n in names if n in chosen], len(names) - len(chosen)
