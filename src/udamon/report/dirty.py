"""``report dirty``: how fast each target dirties memory (live migration).

The number wanted is distinct bytes written per second: pre-copy migration
re-sends a page once per round however often it was written.  Per snapshot:

* observational records (replay, hint), which count each region's distinct
  written pages (``written_pages``): those pages' bytes / aggregation interval.
  Exact for replay input; a lower bound for hint (only scanned pages fault).
* controlled records (wp), and older records without the count: the sampling
  estimate  sum over regions of size * (write samples / sampling intervals per
  aggregation) / aggregation interval, i.e. each region's bytes weighted by the
  chance that its sampled page was written.  (Used on observational reports
  this over-counts sparse writers: one write anywhere in a big region in a
  sampling interval would count the whole region.)

"Regions written" is the upper bound: the bytes of the regions with any write
in the interval, per second.  Targets are ranked slowest dirtier first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.core.regions import PAGE
from udamon.errors import ParameterError
from udamon.record.reader import Record
from udamon.report.common import (
    aggr_samples,
    describe_source,
    fmt_rate,
    notes,
    percentiles,
    pick_pids,
    record_line,
    render_table,
    t0_of,
    target_name,
    values,
    write_source,
    writes_from,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_duration_ns

STABLE_WITHIN = 0.10  # |slope * duration| below this fraction of the mean: stable


@dataclass
class TargetDirty:
    pid: int
    elapsed_ns: np.ndarray
    rate: np.ndarray  # estimated dirty bytes/s per snapshot
    upper: np.ndarray  # bytes/s of regions with any write, per snapshot

    @property
    def mean(self) -> float:
        return float(self.rate.mean()) if self.rate.size else 0.0

    @property
    def median(self) -> float:
        return percentiles(self.rate, (50,))[0]

    @property
    def p90(self) -> float:
        return percentiles(self.rate, (90,))[0]

    @property
    def slope(self) -> float:
        """Least-squares slope of the rate over time, bytes/s per second."""
        if self.rate.size < 2:
            return 0.0
        t = self.elapsed_ns / 1e9
        if np.ptp(t) == 0:
            return 0.0
        return float(np.polyfit(t, self.rate, 1)[0])

    @property
    def trend(self) -> str:
        span = float(np.ptp(self.elapsed_ns)) / 1e9 if self.rate.size else 0.0
        change = self.slope * span
        if self.mean <= 0 or abs(change) < STABLE_WITHIN * self.mean:
            return "stable"
        return "rising" if change > 0 else "falling"


@dataclass
class DirtyResult:
    write_src: str | None
    targets: list[TargetDirty]  # slowest dirtier first
    distinct_pages: bool = False  # rates from counted distinct written pages


def compute(rec: Record, pid: int | None) -> DirtyResult:
    wsrc = write_source(rec, "report dirty")
    t0 = t0_of(rec)
    out = []
    distinct = rec.coverage != "controlled" and bool(rec.header.get("written_pages"))
    for p in pick_pids(rec, pid):
        snaps = rec.snapshots_of(p)
        rate, upper = [], []
        for s in snaps:
            size = (s.end - s.start).astype(np.float64)
            w = values(s, wsrc)
            secs = max(s.time_ns - s.start_ns, 1) / 1e9
            if distinct and s.written_pages is not None:
                rate.append(float(s.written_pages.sum()) * PAGE / secs)
            else:
                rate.append(float((size * np.minimum(w / aggr_samples(s), 1.0)).sum()) / secs)
            upper.append(float(size[w > 0].sum()) / secs)
        out.append(TargetDirty(p, np.array([s.time_ns - t0 for s in snaps], dtype=np.int64),
                               np.array(rate), np.array(upper)))
    out.sort(key=lambda t: (t.mean, t.pid))
    return DirtyResult(wsrc, out, distinct)


def to_json(rec: Record, res: DirtyResult) -> dict:
    return {
        "record": rec.path, "coverage": rec.coverage,
        "writes_from": describe_source(res.write_src),
        "method": "distinct written pages" if res.distinct_pages else "sampling estimate",
        "window_ns": rec.attrs.aggr_us * 1000,
        "targets": [{
            "rank": i + 1, "pid": t.pid, "mean_bps": t.mean, "median_bps": t.median,
            "p90_bps": t.p90, "slope_bps_per_s": t.slope, "trend": t.trend,
            "upper_mean_bps": float(t.upper.mean()) if t.upper.size else 0.0,
            "series": [{"elapsed_ns": int(e), "bps": float(r), "upper_bps": float(u)}
                       for e, r, u in zip(t.elapsed_ns, t.rate, t.upper, strict=True)],
        } for i, t in enumerate(res.targets)],
    }


def to_text(rec: Record, res: DirtyResult) -> str:
    lines = [record_line(rec)]
    if res.distinct_pages:
        lines.append("writes from: the reports' write flag (distinct pages counted per region); "
                     f"'regions written' from {writes_from(rec, res.write_src)}")
    else:
        lines.append(f"writes from: {writes_from(rec, res.write_src)}")
    if res.distinct_pages:
        lines.append("dirty rate: distinct pages written (by reports that pass the sample "
                     "filters) per aggregation interval, per second")
    else:
        lines.append(f"dirty rate from {describe_source(res.write_src)}: per snapshot, region "
                     "bytes x fraction of sampling intervals written / aggregation interval")
    lines += notes(rec)
    if rec.coverage == "unknown":
        lines.append("note: with unknown coverage unobserved writes are missing: rates are "
                     "lower bounds")
    if not res.distinct_pages:
        lines.append("note: DAMON's region counts are not a migration dirty rate (distinct "
                     "pages per window, QEMU's definition): 'udamon dirty-rate' measures that")
    lines.append("targets, slowest dirtier first (best live-migration candidate first):")
    table = [["rank", "pid", "name", "mean", "median", "p90", "regions written", "trend",
              "slope"]]
    for i, t in enumerate(res.targets):
        span = fmt_duration_ns(int(np.ptp(t.elapsed_ns))) if t.rate.size else "0 ns"
        table.append([str(i + 1), str(t.pid), target_name(rec, t.pid), fmt_rate(t.mean),
                      fmt_rate(t.median), fmt_rate(t.p90),
                      fmt_rate(float(t.upper.mean()) if t.upper.size else 0.0), t.trend,
                      ("-" if t.slope < 0 else "+") + f"{fmt_rate(abs(t.slope))} per s "
                      f"over {span}"])
    lines += render_table(table, left=3)
    lines.append("'regions written': bytes of regions with any write per second (upper "
                 "bound); trend: least-squares slope, stable when it changes the rate by less "
                 f"than {STABLE_WITHIN:.0%} of the mean over the record")
    return "\n".join(lines) + "\n"


# -- the kind ---------------------------------------------------------------------


@dataclass
class DirtyOptions:
    pid: int | None = None
    bandwidth_bps: float | None = None  # add QEMU's pre-copy estimate (dirty-rate records)
    downtime_ns: int | None = None  # its downtime limit (default QEMU's 300 ms)


def _compute(rec: Record, o: DirtyOptions):
    """A record of ``udamon dirty-rate`` holds the estimator's windows; any other
    record is read for its written regions."""
    from udamon.report import dirty_rate, dirty_record, precopy
    from udamon.report.common import pick_pids

    if not dirty_record.is_dirty_record(rec):
        if o.bandwidth_bps is not None or o.downtime_ns is not None:
            raise ParameterError("bandwidth_bps", "{param} and the downtime need a record of "
                                 "'udamon dirty-rate' ({path} was made by 'udamon record')",
                                 path=rec.path)
        return compute(rec, o.pid)
    pick_pids(rec, o.pid)
    est = rec.header["estimator"]
    series = dirty_record.series_from_record(rec, o.pid)
    return dirty_rate.compute(series, window_ns=int(est.get("window_ns", 1_000_000_000)),
                              confidence=float(est.get("confidence", 0.95)),
                              precision=float(est.get("precision") or 1.25),
                              exact=est.get("mode") == "exact", bandwidth_bps=o.bandwidth_bps,
                              downtime_ns=(o.downtime_ns if o.downtime_ns is not None
                                           else precopy.DEFAULT_DOWNTIME_NS))


def _text(rec: Record, res, o: DirtyOptions) -> str:
    from udamon.report import dirty_rate
    from udamon.report.common import record_line

    if isinstance(res, DirtyResult):
        return to_text(rec, res)
    return dirty_rate.to_text(res, [record_line(rec)])


def _json(rec: Record, res, o: DirtyOptions) -> dict:
    from udamon.report import dirty_rate

    return to_json(rec, res) if isinstance(res, DirtyResult) else dirty_rate.to_json(res, rec.path)


KIND = ReportKind("dirty", "dirty rate per target, slowest dirtier first (live migration; "
                  "records of udamon dirty-rate too)", ("text", "json"), DirtyOptions,
                  _compute, _text, _json)
