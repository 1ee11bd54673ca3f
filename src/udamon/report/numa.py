"""``report numa``: accesses by the CPUs of each node versus where the pages are.

Accesses per node come from the ``node:<n>`` probes.  Page locations come from
the snapshot lines' per-region key ``"nodes": {"<node>": sampled_page_count}``
(``Snapshot.page_nodes``); a region without it, or with no pages counted, has
an unknown location and is left out of the local/remote split.
In a snapshot, the local share of a region's accesses by node m is the
fraction of its sampled pages on m; remote is the rest.  Everything is
accumulated onto the last snapshot's regions and weighted by bytes: a
region's accesses are its size times its access rate (hits / sampling
intervals per aggregation), averaged over the snapshots ("hot bytes").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.core.monitor import Snapshot
from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report.common import (
    aggr_samples,
    breakdown,
    fmt_pct,
    notes,
    onto_regions,
    pick_pids,
    record_line,
    render_table,
    target_name,
)
from udamon.units import fmt_size

PageNodes = dict[int, np.ndarray]  # node -> sampled page count per region


def page_nodes_of(snap: Snapshot) -> PageNodes | None:
    """``Snapshot.page_nodes`` (per region {"<node>": sampled pages}) as node ->
    per-region counts; None when the snapshot has no page locations."""
    per = getattr(snap, "page_nodes", None)
    if not per:
        return None
    nodes = sorted({int(k) for d in per for k in d if int(k) >= 0})
    if not nodes:
        return None
    out = {n: np.zeros(len(per)) for n in nodes}
    for i, d in enumerate(per):
        for k, c in d.items():
            if int(k) >= 0:
                out[int(k)][i] = float(c)
    return out


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


def compute(rec: Record, pid: int | None) -> NumaResult:
    probes = breakdown(rec, "node")
    if not probes:
        raise UsageError(f"{rec.path} has no node:<n> probes: record with --breakdown node "
                         "(or probes named node:<n>, e.g. --probe node:0=nodes:0)")
    pids = pick_pids(rec, pid)
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
            for n, name in probes.items():
                local += onto_regions(snaps, start, end,
                                      lambda s, n=n, name=name: rate(s, name) * frac(s, n)
                                      ) * scale
                known += onto_regions(snaps, start, end,
                                      lambda s, name=name: rate(s, name) * known_mask(s)
                                      ) * scale
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
        local = sum(r.local for r in t.regions)
        known = sum(r.known for r in t.regions)
        return {
            "pid": t.pid, "by_node": {str(n): v for n, v in t.by_node().items()},
            "local": local if res.has_pages else None,
            "remote": known - local if res.has_pages else None,
            "local_ratio": (local / known if known else None) if res.has_pages else None,
            "regions": [{"start": r.start, "end": r.end, "size": r.end - r.start,
                         "by_node": {str(n): v for n, v in r.by_node.items()},
                         "pages": {str(n): v for n, v in r.pages.items()} if res.has_pages
                         else None,
                         "local": r.local if res.has_pages else None,
                         "remote": r.remote if res.has_pages else None}
                        for r in t.regions],
        }
    return {"record": rec.path, "coverage": rec.coverage, "nodes": res.nodes,
            "page_locations": res.has_pages,
            "unit": "hot bytes: region bytes x access rate, mean over snapshots",
            "targets": [target(t) for t in res.targets]}


def _shares(d: dict[int, float]) -> str:
    tot = sum(d.values())
    if tot <= 0:
        return "-"
    return " ".join(f"n{n}:{v / tot * 100:.0f}%" for n, v in sorted(d.items()))


def to_text(rec: Record, res: NumaResult, top: int = 10) -> str:
    lines = [record_line(rec)]
    lines.append(f"NUMA: accesses by the CPUs of each node (probes "
                 f"{', '.join(f'node:{n}' for n in res.nodes)}), in hot bytes")
    lines += notes(rec)
    if not res.has_pages:
        lines.append("page locations: not in this record, so there is no local/remote split "
                     "(it needs per-region page nodes, key 'nodes' in the snapshots); "
                     "showing the per-node access split only")
    for t in res.targets:
        bn = t.by_node()
        lines.append(f"\ntarget {t.pid} {target_name(rec, t.pid)}: accesses by node: "
                     f"{_shares(bn)}")
        if res.has_pages:
            local = sum(r.local for r in t.regions)
            known = sum(r.known for r in t.regions)
            total = sum(bn.values())
            lines.append(f"  local {fmt_pct(local / known if known else float('nan'))}, "
                         f"remote {fmt_pct((known - local) / known if known else float('nan'))}"
                         f" of the accesses to pages of known location "
                         f"({fmt_pct(known / total if total else float('nan'))} of all)")
            hot = sorted((r for r in t.regions if r.remote > 0),
                         key=lambda r: (-r.remote, r.start))[:top]
            if hot:
                lines.append("  hottest remotely accessed regions:")
                table = [["start", "end", "size", "remote", "remote %", "accessed by",
                          "pages on"]]
                for r in hot:
                    table.append([f"{r.start:#x}", f"{r.end:#x}", fmt_size(r.end - r.start),
                                  fmt_size(r.remote), fmt_pct(r.remote / r.known),
                                  _shares(r.by_node), _shares(r.pages)])
                lines += render_table(table, left=2, indent="    ")
            else:
                lines.append("  no remote accesses to pages of known location")
        else:
            hot = sorted((r for r in t.regions if r.total > 0),
                         key=lambda r: (-r.total, r.start))[:top]
            if hot:
                lines.append("  most accessed regions:")
                table = [["start", "end", "size", "accesses", "accessed by"]]
                for r in hot:
                    table.append([f"{r.start:#x}", f"{r.end:#x}", fmt_size(r.end - r.start),
                                  fmt_size(r.total), _shares(r.by_node)])
                lines += render_table(table, left=2, indent="    ")
    lines.append("\naccesses in hot bytes: region bytes x access rate (hits per sampling "
                 "interval), mean over the snapshots")
    return "\n".join(lines) + "\n"
