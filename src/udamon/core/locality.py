"""NUMA locality of a snapshot's accesses: which node's CPUs made them (the
``node:<n>`` probes) and whether the page was on that node.  One analysis for every
user: ``report numa``, the Prometheus exporter's local ratio and the migration
scheme's candidates all read it from here.

Two sources, best first: the ``local``/``remote`` probes (each report's CPU node
against its page's node, exact per report, ``--breakdown numa``), else the node
probes weighed by where the region's located pages are (``page_nodes``: an access
from node n counts as local in proportion to the region's pages on n)."""

from __future__ import annotations

import numpy as np

from udamon.core.monitor import Snapshot


def node_probe_hits(snap: Snapshot) -> tuple[list[int], np.ndarray]:
    """The nodes with a ``node:<n>`` probe and a (nodes x regions) matrix of their hits."""
    nodes, rows = [], []
    for name, hits in snap.probe_hits.items():
        kind, _, val = name.partition(":")
        if kind == "node" and val.isdigit():
            nodes.append(int(val))
            rows.append(np.asarray(hits, dtype=np.int64))
    if not nodes:
        return [], np.zeros((0, snap.start.size), dtype=np.int64)
    return nodes, np.vstack(rows)


def page_shares(snap: Snapshot, nodes: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(nodes x regions share of the region's located pages on each of ``nodes``,
    regions mask of those with a located page), or None without page nodes."""
    pn = snap.page_nodes
    if pn is None:
        return None
    tot = pn.sum(axis=1)
    located = tot > 0
    out = np.zeros((len(nodes), snap.start.size))
    for i, n in enumerate(nodes):
        if n < pn.shape[1]:
            out[i] = np.where(located, pn[:, n] / np.where(located, tot, 1), 0.0)
    return out, located


def region_locality(snap: Snapshot) -> tuple[np.ndarray, np.ndarray] | None:
    """Per region (local, located) in probe hits: hits known to be local, and hits
    whose locality is known at all; None when the snapshot cannot tell."""
    local = snap.probe_hits.get("local")
    remote = snap.probe_hits.get("remote")
    if local is not None and remote is not None:
        lo = np.asarray(local, dtype=np.float64)
        return lo, lo + np.asarray(remote, dtype=np.float64)
    nodes, hits = node_probe_hits(snap)
    shares = page_shares(snap, nodes) if nodes else None
    if shares is None:
        return None
    frac, located = shares
    return (hits * frac).sum(axis=0), hits.sum(axis=0) * located


def target_locality(snap: Snapshot) -> tuple[float, float] | None:
    """(local, located) for the whole target in one aggregation: exact report counts
    where the snapshot has them (``numa``), else its regions' hits weighed by size."""
    if snap.numa is not None:
        return float(snap.numa["local"]), float(snap.numa["local"] + snap.numa["remote"])
    per = region_locality(snap)
    if per is None:
        return None
    size = (snap.end - snap.start).astype(np.float64)
    return float((per[0] * size).sum()), float((per[1] * size).sum())
