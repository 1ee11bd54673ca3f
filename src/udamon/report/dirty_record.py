"""The record of ``udamon dirty-rate``: its windows as snapshots, and reading them back.

A record like any other (record-format.md): the header names the estimator
(``"estimator": {"kind": "dirty-rate", ...}``) and, per target, which part's
rate counts and what VMM it is; each window is one snapshot per target (sampling
and aggregation interval = the window, ``regions`` empty: the estimate is not
region-based) whose ``dirty`` key holds the counts udamon.report.dirty_rate
needs: per part the frame, the sample, the dirtied and new pages, and the
exposure.
"""

from __future__ import annotations

from udamon.core.attrs import Attrs
from udamon.errors import InputError
from udamon.primitives.dirty_sample import PartWindow, TargetWindow
from udamon.record.reader import Record
from udamon.record.writer import RecordWriter, build_header
from udamon.report.dirty_rate import DEFINITION, TargetSeries

KIND = "dirty-rate"


def is_dirty_record(rec: Record) -> bool:
    est = rec.header.get("estimator")
    return isinstance(est, dict) and est.get("kind") == KIND


class _T:
    """What build_header needs of a target."""

    def __init__(self, d: dict) -> None:
        self.d = d

    def to_dict(self) -> dict:
        return {"pid": self.d["pid"], "name": self.d["name"], "ranges": self.d["ranges"],
                "follows_vmas": True, "rate_part": self.d["rate_part"], "vmm": self.d["vmm"]}


class DirtyRecordWriter:
    def __init__(self, path: str, targets: list[dict], spec) -> None:
        """``spec``: the measurement's DirtyRateSpec (udamon.report.dirty_live)."""
        self.w = RecordWriter(path)
        self.targets = targets
        self.a = spec
        self.last_ns: dict[int, int] = {}

    def begin(self, notes: list[str]) -> None:
        a = self.a
        win_us = max(a.window_ns // 1000, 1)
        attrs = Attrs(sample_us=win_us, aggr_us=win_us, update_us=win_us, min_nr_regions=3,
                      max_nr_regions=max(3, 1000))
        est = {"kind": KIND, "mode": "exact" if a.exact else "sample",
               "window_ns": a.window_ns, "sample_pages_per_gib": a.sample_pages,
               "max_sample_pages": a.max_sample_pages, "confidence": a.confidence,
               "precision": a.precision, "definition": DEFINITION}
        self.w.write_header(build_header(attrs, "wp", "controlled", [], [],
                                         [_T(t) for t in self.targets], clock="monotonic",
                                         notes=notes, estimator=est))

    def window(self, tw: TargetWindow) -> None:
        us = max(self.a.window_ns // 1000, 1)
        end = max(tw.end_ns, self.last_ns.get(tw.pid, 0) + 1, us * 1000)
        self.last_ns[tw.pid] = end
        self.w.write_snapshot({
            "time_ns": end, "pid": tw.pid, "sample_us": us, "aggr_us": us,
            "nr_reports": sum(p.dirtied for p in tw.parts),
            "nr_passed": sum(p.dirtied for p in tw.parts), "regions": [],
            "dirty": {"start_ns": tw.start_ns, "end_ns": tw.end_ns,
                      "parts": [p.to_dict() for p in tw.parts]},
        })

    def end(self, reason: str, notes: list[str], why: str) -> None:
        self.w.close(reason, notes=notes, stopped_because=why)

    def fail(self, error: str) -> None:
        self.w.close("error", error=error)


def series_from_record(rec: Record, pid: int | None = None) -> list[TargetSeries]:
    """The windows of a dirty-rate record, per target."""
    out = []
    for t in rec.header.get("targets", []):
        p = int(t["pid"])
        if pid is not None and p != pid:
            continue
        wins = []
        for s in rec.snapshots_of(p):
            d = (s.extra or {}).get("dirty")
            if d is None:
                continue
            try:
                parts = [PartWindow.from_dict(x) for x in d["parts"]]
                wins.append(TargetWindow(p, int(d["start_ns"]), int(d["end_ns"]), parts))
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{rec.path}: a dirty-rate window of pid {p} is malformed "
                                 f"({type(e).__name__}: {e})") from None
        out.append(TargetSeries(p, str(t.get("name", "")), str(t.get("rate_part", "memory")),
                                wins, t.get("vmm")))
    return out
