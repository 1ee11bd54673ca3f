"""Reading placement's inputs from a record: the thread sharing matrices (those of
``report sharing``) and the measured cross-domain share of sharing accesses, before
and after ``udamon place`` (the planning itself is udamon.schemes.placement)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report import sharing
from udamon.report.common import breakdown
from udamon.schemes.placement import Sharing
from udamon.targets.topology import Topology


def sharing_from_record(rec: Record, pid: int | None) -> Sharing:
    """The thread matrix ``report sharing`` computes (UsageError without two threads)."""
    if len(breakdown(rec, "thread")) < 2:
        raise UsageError(f"{rec.path} has no per-thread probes of two threads or more: "
                         "record with --breakdown thread,rw,cpu (udamon place adds them)")
    res = sharing.compute(rec, pid, None)
    tm = next(m for m in res.matrices if m.kind == "thread")
    return Sharing(list(tm.ids), tm.total, tm.written, res.snapshots)


@dataclass
class CrossMeasure:
    share: float | None  # cross-domain share of sharing accesses; None: none observed
    sharing: float  # byte-weighted hits on regions >= 2 threads accessed (bytes x hits)
    cross: float  # ... of which from outside the region's main domain
    snapshots: int  # snapshots that had such a region
    total_snapshots: int
    why: str | None = None  # why share is None

    def to_dict(self) -> dict:
        return {"share": None if self.share is None else round(self.share, 4),
                "sharing_byte_hits": round(self.sharing, 1),
                "cross_byte_hits": round(self.cross, 1),
                "snapshots_with_sharing": self.snapshots, "snapshots": self.total_snapshots,
                "why": self.why}


def measured_cross(rec: Record, pid: int, topo: Topology) -> CrossMeasure:
    """The share of sharing accesses made from outside the accessed region's main LLC
    domain, from a record's ``thread:<tid>`` and ``cpu:<n>`` probes.  A region is
    shared in a snapshot when two threads or more have hits in it; its accesses are
    its per-CPU hits summed per domain; those of every domain but the one with the
    most are cross-domain.  Weighted by region size, like the sharing matrices."""
    threads, cpus = breakdown(rec, "thread"), breakdown(rec, "cpu")
    snaps = rec.snapshots_of(pid)
    d_of = topo.domain_of_cpu()
    if len(threads) < 2 or not cpus:
        return CrossMeasure(None, 0.0, 0.0, 0, len(snaps),
                            "the record has no per-thread and per-CPU probes")
    known = {c: n for c, n in cpus.items() if c in d_of}
    if not known:
        return CrossMeasure(None, 0.0, 0.0, 0, len(snaps),
                            "the record's CPUs are not CPUs of this topology")
    doms = sorted({d_of[c] for c in known})
    tot = cross = 0.0
    with_sharing = 0
    for s in snaps:
        if s.start.size == 0:
            continue
        h = np.stack([s.probe_hits[n] > 0 for n in threads.values()])
        shared = h.sum(axis=0) >= 2
        if not shared.any():
            continue
        dh = np.zeros((len(doms), s.start.size))
        for c, name in known.items():
            dh[doms.index(d_of[c])] += s.probe_hits[name]
        size = (s.end - s.start).astype(np.float64)
        acc = dh.sum(axis=0)
        cr = acc - dh.max(axis=0)
        m = shared & (acc > 0)
        if not m.any():
            continue
        with_sharing += 1
        tot += float((size[m] * acc[m]).sum())
        cross += float((size[m] * cr[m]).sum())
    if tot <= 0:
        return CrossMeasure(None, 0.0, 0.0, 0, len(snaps),
                            "no region was accessed by two threads in one snapshot")
    return CrossMeasure(cross / tot, tot, cross, with_sharing, len(snaps))
