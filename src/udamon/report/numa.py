"""``report numa``: accesses by the CPUs of each node versus where the pages are.

Records made with ``--breakdown numa`` (live sessions look up the node of every
reported page) have per-report locality: the ``local`` and ``remote`` probes
count, per region, the sampling intervals with a local / remote access, and
each snapshot's ``numa`` key counts the reports themselves, per target and per
thread -- so a target's and a thread's local ratio are exact counts of
reports, independent of region boundaries.

Older records (page locations sampled per region: the snapshot key
``"nodes": {"<node>": pages}``, no local/remote probes) are estimated as
before: in a snapshot, the local share of a region's accesses by node m is the
fraction of its sampled pages on m.

Region values are accumulated onto the last snapshot's regions and weighted by
bytes: a region's accesses are its size times its access rate (hits / sampling
intervals per aggregation), averaged over the snapshots ("hot bytes").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from udamon.core.locality import region_locality
from udamon.core.monitor import Snapshot
from udamon.core.names import join_names, thread_label
from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report.common import (
    aggr_samples,
    breakdown,
    fmt_pct,
    mappings_of,
    notes,
    onto_regions,
    pick_pids,
    record_line,
    render_table,
    target_name,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_size

PageNodes = dict[int, np.ndarray]  # node -> sampled page count per region


def page_nodes_of(snap: Snapshot) -> PageNodes | None:
    """``Snapshot.page_nodes`` (regions x nodes pages) as node -> per-region counts
    of the nodes that hold any; None when the snapshot has no page locations."""
    per = snap.page_nodes
    if per is None or not per.any():
        return None
    return {int(n): per[:, n].astype(float) for n in np.flatnonzero(per.any(axis=0))}


def load_page_nodes(rec: Record) -> list[PageNodes | None]:
    """Page locations per snapshot, aligned with ``rec.snapshots``."""
    return [page_nodes_of(s) for s in rec.snapshots]


@dataclass
class NumaRegion:
    start: int
    end: int
    by_node: dict[int, float]  # byte-weighted hits by the CPUs of each node
    pages: dict[int, float]  # mean fraction of sampled pages on each node
    local: float  # byte-weighted hits that were local (known page location)
    known: float  # byte-weighted hits with a known page location

    @property
    def total(self) -> float:
        return sum(self.by_node.values())

    @property
    def remote(self) -> float:
        return self.known - self.local


@dataclass
class TargetNuma:
    pid: int
    regions: list[NumaRegion]
    # exact counts of reports (Snapshot.numa summed): local, remote, unknown; per thread
    reports: dict[str, int] | None = None
    threads: dict[str, list[int]] | None = None

    def by_node(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for r in self.regions:
            for n, v in r.by_node.items():
                out[n] = out.get(n, 0.0) + v
        return out


@dataclass
class NumaResult:
    nodes: list[int]
    has_pages: bool
    targets: list[TargetNuma]
    # what the record cannot answer (a record without local/remote or node probes:
    # only the exact report counts and where the reported pages are)
    cannot: list[str] = field(default_factory=list)

    @property
    def per_region(self) -> bool:
        """Whether per-region accesses (by node, local/remote) are known."""
        return not self.cannot


def _tally(snaps: list[Snapshot]) -> tuple[dict[str, int] | None, dict[str, list[int]] | None]:
    parts = [s.numa for s in snaps if s.numa is not None]
    if not parts:
        return None, None
    tot = {k: sum(p[k] for p in parts) for k in ("local", "remote", "unknown")}
    threads: dict[str, list[int]] = {}
    for p in parts:
        for tid, v in p["threads"].items():
            prev = threads.get(tid, [0, 0, 0])
            threads[tid] = [a + b for a, b in zip(prev, v, strict=True)]
    return tot, threads


def _compute_probed(rec: Record, pids: list[int], probes: dict[int, str]) -> NumaResult:
    """Per-report locality: the local/remote probes per region, the numa tallies."""
    out = []
    for p in pids:
        snaps = rec.snapshots_of(p)
        last = snaps[-1]
        start, end = last.start, last.end
        size = (end - start).astype(np.float64)
        scale = size / len(snaps)

        def rate(s: Snapshot, name: str) -> np.ndarray:
            return s.probe_hits[name] / aggr_samples(s)

        local = onto_regions(snaps, start, end, lambda s: _locality_rate(s, 0)) * scale
        known = onto_regions(snaps, start, end, lambda s: _locality_rate(s, 1)) * scale
        by_node = {n: onto_regions(snaps, start, end, lambda s, name=name: rate(s, name))
                   * scale for n, name in probes.items()}
        pn = [page_nodes_of(s) for s in snaps]
        all_nodes = sorted({n for d in pn if d for n in d})
        known_mask = [(sum(d.values()) > 0).astype(np.float64) if d else
                      np.zeros(s.start.size) for s, d in zip(snaps, pn, strict=True)]
        where = {id(s): (d, k) for s, d, k in zip(snaps, pn, known_mask, strict=True)}
        seen = onto_regions(snaps, start, end, lambda s, w=where: w[id(s)][1])
        pages: dict[int, np.ndarray] = {}
        for n in all_nodes:
            def frac(s: Snapshot, n=n, w=where) -> np.ndarray:
                d, _ = w[id(s)]
                if not d:
                    return np.zeros(s.start.size)
                tot = sum(d.values())
                return np.where(tot > 0, d.get(n, 0) / np.where(tot > 0, tot, 1), 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                pages[n] = np.where(seen > 0, onto_regions(snaps, start, end, frac)
                                    / np.where(seen > 0, seen, 1), 0.0)
        regions = [NumaRegion(int(start[i]), int(end[i]),
                              {n: float(v[i]) for n, v in by_node.items()},
                              {n: float(v[i]) for n, v in pages.items() if v[i] > 0},
                              float(local[i]), float(known[i]))
                   for i in range(size.size)]
        tot, threads = _tally(snaps)
        out.append(TargetNuma(p, regions, tot, threads))
    return NumaResult(list(probes), True, out)


CANNOT = ("per-region local and remote accesses, and accesses by the CPUs of each node: "
          "this record has no local/remote or node:<n> probes (record with --breakdown numa "
          "for local/remote per region, or --breakdown node for accesses by node)")


def _page_shares(snaps: list[Snapshot], start: np.ndarray, end: np.ndarray
                 ) -> dict[int, np.ndarray]:
    """Per node, the mean share of each range's reported pages that the node held."""
    pn = [page_nodes_of(s) for s in snaps]
    where = {id(s): d for s, d in zip(snaps, pn, strict=True)}
    seen = onto_regions(snaps, start, end, lambda s: (
        (sum(where[id(s)].values()) > 0).astype(np.float64) if where[id(s)]
        else np.zeros(s.start.size)))
    out: dict[int, np.ndarray] = {}
    for n in sorted({n for d in pn if d for n in d}):
        def frac(s: Snapshot, n=n) -> np.ndarray:
            d = where[id(s)]
            if not d:
                return np.zeros(s.start.size)
            tot = sum(d.values())
            return np.where(tot > 0, d.get(n, 0) / np.where(tot > 0, tot, 1), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[n] = np.where(seen > 0, onto_regions(snaps, start, end, frac)
                              / np.where(seen > 0, seen, 1), 0.0)
    return out


def _compute_counts(rec: Record, pids: list[int]) -> NumaResult:
    """A record without locality probes: the exact local/remote counts of its reports
    (per target and thread, the snapshots' ``numa``) and where the reported pages were
    (``nodes``) still answer "how local is this process / thread"; what needs probes
    is said, not guessed."""
    out = []
    has_pages = False
    for p in pids:
        snaps = rec.snapshots_of(p)
        last = snaps[-1]
        pages = _page_shares(snaps, last.start, last.end)
        has_pages = has_pages or bool(pages)
        regions = [NumaRegion(int(last.start[i]), int(last.end[i]), {},
                              {n: float(v[i]) for n, v in pages.items() if v[i] > 0}, 0.0, 0.0)
                   for i in range(last.start.size)]
        tot, threads = _tally(snaps)
        out.append(TargetNuma(p, regions, tot, threads))
    if not has_pages and all(t.reports is None for t in out):
        raise UsageError(
            f"{rec.path} holds no NUMA information: no local/remote or node:<n> probes and "
            "no page nodes (record a live session without --no-page-nodes, and with "
            "--breakdown numa for local/remote per region or --breakdown node for "
            "accesses by node)")
    return NumaResult([], has_pages, out, cannot=[CANNOT])


def _locality_rate(s: Snapshot, which: int) -> np.ndarray:
    """Per region, hits known local (0) or of known locality (1) per sampling interval:
    the one analysis of udamon.core.locality (the exporter and migrate read it too)."""
    per = region_locality(s)
    return np.zeros(s.start.size) if per is None else per[which] / aggr_samples(s)


def compute(rec: Record, pid: int | None) -> NumaResult:
    probes = breakdown(rec, "node")
    pids = pick_pids(rec, pid)
    if {"local", "remote"} <= set(rec.probe_names):
        return _compute_probed(rec, pids, probes)
    if not probes:
        return _compute_counts(rec, pids)
    page_nodes = load_page_nodes(rec)
    where: dict[int, PageNodes | None] = {id(s): pn for s, pn in zip(rec.snapshots, page_nodes,
                                                                      strict=True)}
    has_pages = any(pn for pn in page_nodes)
    nodes = list(probes)
    out = []
    for p in pids:
        snaps = rec.snapshots_of(p)
        last = snaps[-1]
        start, end = last.start, last.end
        size = (end - start).astype(np.float64)

        def frac(s: Snapshot, n: int) -> np.ndarray:
            pn = where[id(s)]
            if not pn:
                return np.zeros(s.start.size)
            tot = sum(pn.values())
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(tot > 0, pn.get(n, np.zeros(s.start.size)) / np.where(
                    tot > 0, tot, 1), 0.0)

        def known_mask(s: Snapshot) -> np.ndarray:
            pn = where[id(s)]
            if not pn:
                return np.zeros(s.start.size)
            return (sum(pn.values()) > 0).astype(np.float64)

        scale = size / len(snaps)  # -> mean per snapshot of bytes x access rate

        def rate(s: Snapshot, name: str) -> np.ndarray:
            return s.probe_hits[name] / aggr_samples(s)

        by_node = {n: onto_regions(snaps, start, end, lambda s, name=name: rate(s, name))
                   * scale for n, name in probes.items()}
        local = np.zeros(size.size)
        known = np.zeros(size.size)
        pages: dict[int, np.ndarray] = {}
        if has_pages:
            local = onto_regions(snaps, start, end, lambda s: _locality_rate(s, 0)) * scale
            known = onto_regions(snaps, start, end, lambda s: _locality_rate(s, 1)) * scale
            all_nodes = sorted({n for pn in page_nodes if pn for n in pn} | set(nodes))
            seen = onto_regions(snaps, start, end, known_mask)
            for n in all_nodes:
                with np.errstate(invalid="ignore", divide="ignore"):
                    pages[n] = np.where(seen > 0, onto_regions(
                        snaps, start, end, lambda s, n=n: frac(s, n)) / np.where(
                        seen > 0, seen, 1), 0.0)
        regions = [NumaRegion(int(start[i]), int(end[i]),
                              {n: float(v[i]) for n, v in by_node.items()},
                              {n: float(v[i]) for n, v in pages.items() if v[i] > 0},
                              float(local[i]), float(known[i])) for i in range(size.size)]
        out.append(TargetNuma(p, regions))
    return NumaResult(nodes, has_pages, out)


def to_json(rec: Record, res: NumaResult) -> dict:
    def target(t: TargetNuma) -> dict:
        tnames = rec.thread_names(t.pid)
        maps = mappings_of(rec, t.pid, [r.start for r in t.regions],
                           [r.end for r in t.regions]) or [None] * len(t.regions)
        local = sum(r.local for r in t.regions)
        known = sum(r.known for r in t.regions)
        ratio = (local / known if known else None) if res.has_pages else None
        extra: dict = {}
        if t.reports is not None:
            lr = t.reports["local"] + t.reports["remote"]
            ratio = t.reports["local"] / lr if lr else None  # exact: counts of reports
            extra = {"reports": t.reports, "threads": {
                tid: {"name": tnames.get(int(tid)) if tid.isdigit() else None,
                      "local": v[0], "remote": v[1], "unknown": v[2],
                      "local_ratio": v[0] / (v[0] + v[1]) if v[0] + v[1] else None}
                for tid, v in sorted((t.threads or {}).items(),
                                     key=lambda kv: -sum(kv[1]))}}
        per = res.per_region and res.has_pages
        return {
            "pid": t.pid, "by_node": {str(n): v for n, v in t.by_node().items()},
            "local": local if per else None,
            "remote": known - local if per else None,
            "local_ratio": ratio, **extra,
            "regions": [{"start": r.start, "end": r.end, "size": r.end - r.start,
                         "mappings": m,
                         "by_node": {str(n): v for n, v in r.by_node.items()},
                         "pages": {str(n): v for n, v in r.pages.items()} if res.has_pages
                         else None,
                         "local": r.local if per else None,
                         "remote": r.remote if per else None}
                        for r, m in zip(t.regions, maps, strict=True)],
        }
    return {"record": rec.path, "coverage": rec.coverage, "nodes": res.nodes,
            "page_locations": res.has_pages, "per_region": res.per_region,
            "cannot": res.cannot,
            "unit": "hot bytes: region bytes x access rate, mean over snapshots",
            "targets": [target(t) for t in res.targets]}


def _shares(d: dict[int, float]) -> str:
    tot = sum(d.values())
    if tot <= 0:
        return "-"
    return " ".join(f"n{n}:{v / tot * 100:.0f}%" for n, v in sorted(d.items()))


def to_text(rec: Record, res: NumaResult, top: int = 10) -> str:
    lines = [record_line(rec)]
    if res.nodes:
        lines.append(f"NUMA: accesses by the CPUs of each node (probes "
                     f"{', '.join(f'node:{n}' for n in res.nodes)}), in hot bytes")
    elif res.per_region:
        lines.append("NUMA: local and remote accesses (probes local, remote), in hot bytes")
    else:
        lines.append("NUMA: local and remote accesses (each report with its page's node) "
                     "and where the reported pages are")
    lines += notes(rec)
    if not res.per_region:
        return _counts_text(rec, res, lines, top)
    if not res.has_pages:
        lines.append("page locations: not in this record, so there is no local/remote split "
                     "(it needs per-region page nodes, key 'nodes' in the snapshots); "
                     "showing the per-node access split only")
    for t in res.targets:
        bn = t.by_node()
        tnames = rec.thread_names(t.pid)

        def named(regions: list[NumaRegion], pid: int = t.pid) -> list[str]:
            got = mappings_of(rec, pid, [r.start for r in regions], [r.end for r in regions])
            return [] if got is None else [join_names(m, short=True) for m in got]
        lines.append(f"\ntarget {t.pid} {target_name(rec, t.pid)}: accesses by node: "
                     f"{_shares(bn)}")
        if t.reports is not None:
            lines.append(_reports_line(t.reports, rec))
            thr = sorted((t.threads or {}).items(), key=lambda kv: -sum(kv[1]))[:top]
            if thr:
                table = [["thread", "local", "remote", "local %"]]
                for tid, v in thr:
                    table.append([thread_label(tid, tnames), f"{v[0]:,}", f"{v[1]:,}",
                                  fmt_pct(v[0] / (v[0] + v[1]) if v[0] + v[1] else float("nan"))])
                lines.append("  by thread:")
                lines += render_table(table, left=1, indent="    ")
        if res.has_pages:
            local = sum(r.local for r in t.regions)
            known = sum(r.known for r in t.regions)
            total = sum(bn.values()) or known
            lines.append(f"  local {fmt_pct(local / known if known else float('nan'))}, "
                         f"remote {fmt_pct((known - local) / known if known else float('nan'))}"
                         f" of the accesses to pages of known location "
                         f"({fmt_pct(known / total if total else float('nan'))} of all), "
                         "in hot bytes")
            hot = sorted((r for r in t.regions if r.remote > 0),
                         key=lambda r: (-r.remote, r.start))[:top]
            if hot:
                lines.append("  hottest remotely accessed regions:")
                where = named(hot)
                table = [["start", "end", *(["mapping"] if where else []), "size", "remote",
                          "remote %", "accessed by", "pages on"]]
                for k, r in enumerate(hot):
                    table.append([f"{r.start:#x}", f"{r.end:#x}", *where[k:k + 1],
                                  fmt_size(r.end - r.start),
                                  fmt_size(r.remote), fmt_pct(r.remote / r.known),
                                  _shares(r.by_node), _shares(r.pages)])
                lines += render_table(table, left=3 if where else 2, indent="    ")
            else:
                lines.append("  no remote accesses to pages of known location")
        else:
            hot = sorted((r for r in t.regions if r.total > 0),
                         key=lambda r: (-r.total, r.start))[:top]
            if hot:
                lines.append("  most accessed regions:")
                where = named(hot)
                table = [["start", "end", *(["mapping"] if where else []), "size",
                          "accesses", "accessed by"]]
                for k, r in enumerate(hot):
                    table.append([f"{r.start:#x}", f"{r.end:#x}", *where[k:k + 1],
                                  fmt_size(r.end - r.start),
                                  fmt_size(r.total), _shares(r.by_node)])
                lines += render_table(table, left=3 if where else 2, indent="    ")
    lines.append("\naccesses in hot bytes: region bytes x access rate (hits per sampling "
                 "interval), mean over the snapshots")
    return "\n".join(lines) + "\n"


def _reports_line(rp: dict[str, int], rec: Record) -> str:
    """The target's locality counts; a controlled record's count sampled regions' pages
    (docs/record-format.md), an estimate, not reports."""
    lr = rp["local"] + rp["remote"]
    nan = float("nan")
    what, unit = (("pages", "estimated from the sampled regions' pages")
                  if rec.coverage == "controlled" else ("reports", "exact counts"))
    return (f"  {what}: local {fmt_pct(rp['local'] / lr if lr else nan)}, "
            f"remote {fmt_pct(rp['remote'] / lr if lr else nan)} of "
            f"{lr:,} of known locality ({rp['unknown']:,} unknown; {unit})")


def _counts_text(rec: Record, res: NumaResult, lines: list[str], top: int) -> str:
    """A record without locality probes: what it can answer, and what it cannot."""
    nan = float("nan")
    for t in res.targets:
        lines.append(f"\ntarget {t.pid} {target_name(rec, t.pid)}")
        if t.reports is not None:
            lines.append(_reports_line(t.reports, rec))
            thr = sorted((t.threads or {}).items(), key=lambda kv: -sum(kv[1]))[:top]
            if thr:
                table = [["thread", "local", "remote", "local %"]]
                for tid, v in thr:
                    table.append([tid, f"{v[0]:,}", f"{v[1]:,}",
                                  fmt_pct(v[0] / (v[0] + v[1]) if v[0] + v[1] else nan)])
                lines.append("  by thread:")
                lines += render_table(table, left=1, indent="    ")
        else:
            lines.append("  reports: no local/remote counts in this record")
        placed = sorted((r for r in t.regions if r.pages),
                        key=lambda r: (-(r.end - r.start), r.start))[:top]
        if placed:
            lines.append("  where the reported pages are (largest regions first):")
            table = [["start", "end", "size", "pages on"]]
            for r in placed:
                table.append([f"{r.start:#x}", f"{r.end:#x}", fmt_size(r.end - r.start),
                              _shares(r.pages)])
            lines += render_table(table, left=2, indent="    ")
    lines.append("")
    lines += [f"not in this record: {c}" for c in res.cannot]
    return "\n".join(lines) + "\n"


# -- the kind ---------------------------------------------------------------------


@dataclass
class NumaOptions:
    pid: int | None = None
    top: int | None = None


KIND = ReportKind("numa", "accesses per node (node:<n> probes) vs page locations: "
                  "local/remote", ("text", "json"), NumaOptions,
                  lambda rec, o: compute(rec, o.pid),
                  lambda rec, res, o: to_text(rec, res, o.top or 10),
                  lambda rec, res, o: to_json(rec, res))
