"""The terminal view of ``udamon monitor``: the hottest regions per probe,
refreshed every aggregation interval (rich)."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from udamon.core.monitor import Monitor, Snapshot
from udamon.core.names import join_names, probe_label, region_mappings
from udamon.core.session import SessionResult
from udamon.units import fmt_duration_ns, fmt_size


class LiveView:
    def __init__(self, top: int = 10, console: Console | None = None):
        self.top = top
        self.console = console or Console()
        self._live: Live | None = None
        self._latest: dict[int, Snapshot] = {}
        self._busy: dict[int, Snapshot] = {}  # latest snapshot with any reports, per target
        self._header: dict = {}
        self._monitor: Monitor | None = None
        self._t0 = time.monotonic()
        self._snaps = 0

    def begin(self, header: dict, monitor: Monitor) -> None:
        self._header = header
        self._monitor = monitor
        self._live = Live(self._render(), console=self.console, refresh_per_second=4,
                          transient=False, auto_refresh=self.console.is_terminal)
        self._live.start()

    def snapshot(self, snap: Snapshot) -> None:
        self._latest[snap.pid] = snap
        if snap.nr_reports:
            self._busy[snap.pid] = snap
        self._snaps += 1
        if self._live is not None and self.console.is_terminal:
            self._live.update(self._render())

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        self._stop(f"ended: {res.reason}; {res.snapshots} snapshots, "
                   f"{monitor.stats.dropped} dropped reports, {res.lost_samples} lost samples")

    def fail(self, error: str) -> None:
        self._stop(f"failed: {error}")

    def _stop(self, line: str) -> None:
        if self._live is not None:
            self._live.update(self._render(line))
            self._live.stop()
            self._live = None

    def _render(self, footer: str | None = None):
        h = self._header
        parts: list = []
        a = h.get("attrs", {})
        parts.append(Text(f"udamon monitor: primitive {h.get('primitive')} (coverage "
                          f"{h.get('coverage')}), "
                          f"sample {fmt_duration_ns(a.get('sample_us', 0) * 1000)}, "
                          f"aggr {fmt_duration_ns(a.get('aggr_us', 0) * 1000)}, "
                          f"{fmt_duration_ns((time.monotonic() - self._t0) * 1e9)} elapsed, "
                          f"{self._snaps} snapshots", style="bold"))
        if h.get("coverage") == "unknown":
            parts.append(Text("hits count observed accesses; 0 means not observed",
                              style="dim"))
        probes = [p["name"] for p in h.get("probes", [])]
        for pid, last in sorted(self._latest.items()):
            snap = last if last.nr_reports or pid not in self._busy else self._busy[pid]
            line = f"target {pid}: {last.nr_reports} reports in the last aggregation"
            if snap is not last:
                line += (f"; showing the last one with reports, "
                         f"{fmt_duration_ns(last.time_ns - snap.time_ns)} earlier")
            parts.append(Text(line + f", {len(snap.start)} regions"))
            for key in ["nr_accesses", *probes]:
                vals = snap.nr_accesses if key == "nr_accesses" else snap.probe_hits[key]
                if not vals.any():
                    continue
                parts.append(self._table(snap, key, vals))
        if footer:
            parts.append(Text(footer))
        return Group(*parts)

    def _table(self, snap: Snapshot, key: str, vals: np.ndarray) -> Table:
        """The top regions by ``key``, with the mappings they are in and the probe's
        thread named (``thread:<tid> (comm)``) when the session knows the names."""
        label = escape(probe_label(key, snap.threads))  # names are not rich markup
        t = Table(title=f"hottest by {label}", title_justify="left", box=None, pad_edge=False)
        order = np.lexsort((snap.start, -vals))[: self.top]
        order = order[vals[order] > 0]
        names = None if snap.names is None else [  # only the rows shown: redrawn often
            escape(join_names(m, short=True))
            for m in region_mappings(snap.names, snap.start[order], snap.end[order])]
        t.add_column("start", no_wrap=True, min_width=14)
        t.add_column("end", no_wrap=True, min_width=14)
        for col, w in (("size", 8), (label, 5), ("age", 7)):
            t.add_column(col, justify="right", no_wrap=col != label, min_width=w)
        if names is not None:  # last: a narrow terminal cuts the names, not the numbers
            t.add_column("mapping", no_wrap=True, overflow="ellipsis", max_width=40)
        for k, i in enumerate(order.tolist()):
            t.add_row(f"{int(snap.start[i]):#x}", f"{int(snap.end[i]):#x}",
                      fmt_size(int(snap.end[i] - snap.start[i])), str(int(vals[i])),
                      fmt_duration_ns(int(snap.age[i]) * snap.aggr_us * 1000),
                      *([names[k]] if names is not None else []))
        return t
