"""Dirty rates with confidence intervals, the ranking of targets, pre-copy estimates.

Input: the windows of udamon.primitives.dirty_sample (live, or read back from a
record of ``udamon dirty-rate``).  Per target and part, a window's rate is

    sample:  (dirtied / sampled x frame + new pages) x page size / window
    exact:   pages written x page size / window

-- distinct pages dirtied in the window, QEMU's definition.  The estimate is the
mean over the windows, each weighted by its precision (a random-effects mean:
the first window's small sample weighs little, a rate that changes from window
to window widens the interval).  Its interval is the wider of

* the **between-window** interval: Hartung-Knapp-Sidik-Jonkman, Student-t with
  k - 1 degrees of freedom, from each window's binomial sampling variance (for
  sampling without replacement; an exact count has none) and the variance
  between the windows (DerSimonian-Laird); and
* the **sampling** interval: the Wilson score interval of the share dirtied,
  pooled over the windows (finite-population corrected), scaled to bytes/s --
  right where few pages were seen dirtied and the normal approximation is not.

A target's estimate has *converged* when it has three windows or more and the
interval lies within a factor ``precision`` (default 1.25) of the estimate (or
its upper end is below one page per second).  Targets are ranked slowest
dirtier first (rank 1: the best live-migration candidate); a VMM's rate is its
guest RAM's, the VMM's own memory is shown apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from udamon.primitives.dirty_sample import PAGE, PartWindow, TargetWindow
from udamon.report import precopy
from udamon.report.intervals import t_quantile, wilson, z_quantile
from udamon.units import fmt_duration_ns, fmt_size

DEFINITION = ("distinct pages dirtied per window (QEMU's calc-dirty-rate definition: pages "
              "written at least once in the measuring period, however often) x page size "
              "/ window")
DEFAULT_CONFIDENCE = 0.95
DEFAULT_PRECISION = 1.25
MIN_WINDOWS = 3
FLOOR_BPS = float(PAGE)  # below one page per second, a rate is "about zero"


@dataclass
class TargetSeries:
    """One target's windows and what it is."""

    pid: int
    name: str
    rate_part: str  # the part whose rate is the target's
    windows: list[TargetWindow]
    vmm: dict | None = None  # {"kind", "how", "ram": [[s, e], ...]} for a VMM


@dataclass
class PartRate:
    name: str
    mean_bps: float
    low_bps: float
    high_bps: float
    windows: int
    resident_bytes: float  # the frame, mean over the windows
    sampled_pages: float  # mean per window
    exact_windows: int
    unobserved: int
    series_bps: list[float] = field(default_factory=list)


@dataclass
class TargetRate:
    pid: int
    name: str
    rate_part: str
    window_ns: int
    parts: list[PartRate]
    converged: bool
    converged_after_ns: int  # elapsed time when it first converged (-1: not yet)
    elapsed_ns: list[int]
    vmm: dict | None = None
    precopy: dict | None = None

    @property
    def rate(self) -> PartRate:
        return next(p for p in self.parts if p.name == self.rate_part)

    @property
    def mean_bps(self) -> float:
        return self.rate.mean_bps


@dataclass
class DirtyRates:
    targets: list[TargetRate]  # slowest dirtier first
    window_ns: int
    confidence: float
    precision: float
    exact: bool
    bandwidth_bps: float | None = None
    downtime_ns: int = precopy.DEFAULT_DOWNTIME_NS


def window_rate(pw: PartWindow, window_ns: int) -> float:
    """``window_ns``: the target's window, for parts that do not say their own."""
    secs = max(pw.window_ns or window_ns, 1) / 1e9
    if pw.exact:
        return pw.dirtied * PAGE / secs
    share = pw.dirtied / pw.sampled if pw.sampled else 0.0
    return (share * pw.population + pw.new_pages) * PAGE / secs


def window_variance(pw: PartWindow, window_ns: int) -> float:
    """The sampling variance of a window's rate (bytes/s squared): binomial, without
    replacement, the share smoothed so that no hits is no certainty; an exact count
    has only its one-page resolution."""
    secs = max(pw.window_ns or window_ns, 1) / 1e9
    floor = (PAGE / secs) ** 2 / 12
    if pw.exact or pw.sampled <= 0 or pw.population <= 0:
        return floor
    p = (pw.dirtied + 1) / (pw.sampled + 2)
    fpc = max(0.0, 1.0 - pw.sampled / pw.population)
    scale = pw.population * PAGE / secs
    return max(floor, scale * scale * p * (1 - p) / pw.sampled * fpc)


def combine(y: list[float], v: list[float], confidence: float) -> tuple[float, float, float]:
    """Random-effects mean of window rates ``y`` with sampling variances ``v``
    (DerSimonian-Laird between-window variance, Hartung-Knapp-Sidik-Jonkman interval
    with its variance factor kept at 1 or more): (mean, low, high).  Windows with a
    small sample weigh little; a rate that changes from window to window widens the
    interval."""
    ya, va = np.asarray(y, dtype=np.float64), np.asarray(v, dtype=np.float64)
    k = ya.size
    w = 1.0 / va
    mu_fe = float((w * ya).sum() / w.sum())
    q = float((w * (ya - mu_fe) ** 2).sum())
    c = float(w.sum() - (w * w).sum() / w.sum())
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 and c > 0 else 0.0
    ws = 1.0 / (va + tau2)
    mu = float((ws * ya).sum() / ws.sum())
    if k < 2:
        half = z_quantile(confidence) * math.sqrt(1.0 / ws.sum())
        return mu, mu - half, mu + half
    hk = float((ws * (ya - mu) ** 2).sum()) / (k - 1)
    half = t_quantile(confidence, k - 1) * math.sqrt(max(hk, 1.0) / ws.sum())
    return mu, mu - half, mu + half


def part_rate(name: str, windows: list[TargetWindow], confidence: float) -> PartRate:
    pws: list[tuple[PartWindow, int]] = [(p, w.window_ns) for w in windows for p in w.parts
                                         if p.name == name]
    if not pws:
        return PartRate(name, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0, 0)
    rates = [window_rate(p, ns) for p, ns in pws]
    mean, low, high = combine(rates, [window_variance(p, ns) for p, ns in pws], confidence)
    # the pooled share's Wilson interval: right for few hits, where the normal one is not
    hits = sum(min(p.dirtied, p.sampled) for p, _ in pws)
    looked = sum(p.sampled for p, _ in pws)
    frame = sum(p.population for p, _ in pws)
    if looked > 0:
        scale = float(np.mean([p.population * PAGE / (max(p.window_ns or ns, 1) / 1e9)
                               for p, ns in pws]))
        extra = float(np.mean([0.0 if p.exact else p.new_pages * PAGE
                               / (max(p.window_ns or ns, 1) / 1e9) for p, ns in pws]))
        fpc = 1.0 - looked / frame if frame else 0.0
        plo, phi = wilson(hits, looked, confidence, fpc)
        low, high = min(low, plo * scale + extra), max(high, phi * scale + extra)
    return PartRate(name, mean, max(0.0, low), max(high, mean), len(pws),
                    float(np.mean([p.population for p, _ in pws])) * PAGE,
                    float(np.mean([p.sampled for p, _ in pws])),
                    sum(p.exact for p, _ in pws), sum(p.unobserved for p, _ in pws), rates)


def converged(pr: PartRate, precision: float) -> bool:
    if pr.windows < MIN_WINDOWS:
        return False
    if pr.high_bps <= FLOOR_BPS:
        return True
    return pr.mean_bps > 0 and pr.high_bps <= precision * pr.mean_bps \
        and pr.low_bps * precision >= pr.mean_bps


def target_rate(ts: TargetSeries, confidence: float, precision: float) -> TargetRate:
    names = list(dict.fromkeys(p.name for w in ts.windows for p in w.parts))
    if ts.rate_part not in names:
        names.insert(0, ts.rate_part)
    parts = [part_rate(n, ts.windows, confidence) for n in names]
    t0 = ts.windows[0].start_ns if ts.windows else 0
    elapsed = [w.end_ns - t0 for w in ts.windows]
    after = -1
    for k in range(MIN_WINDOWS, len(ts.windows) + 1):
        if converged(part_rate(ts.rate_part, ts.windows[:k], confidence), precision):
            after = elapsed[k - 1]
            break
    win = int(np.median([w.window_ns for w in ts.windows])) if ts.windows else 0
    rp = next(p for p in parts if p.name == ts.rate_part)
    return TargetRate(ts.pid, ts.name, ts.rate_part, win, parts, converged(rp, precision),
                      after, elapsed, ts.vmm)


def compute(series: list[TargetSeries], *, window_ns: int, confidence: float = DEFAULT_CONFIDENCE,
            precision: float = DEFAULT_PRECISION, exact: bool = False,
            bandwidth_bps: float | None = None,
            downtime_ns: int = precopy.DEFAULT_DOWNTIME_NS) -> DirtyRates:
    out = [target_rate(s, confidence, precision) for s in series if s.windows]
    out.sort(key=lambda t: (t.mean_bps, t.pid))
    if bandwidth_bps is not None:
        for t in out:
            r = t.rate
            mem = _last_frame(series, t)
            est = {k: precopy.estimate(mem, v, bandwidth_bps, downtime_ns).to_dict()
                   for k, v in (("at_mean", r.mean_bps), ("at_low", r.low_bps),
                                ("at_high", r.high_bps))}
            t.precopy = {"memory_bytes": mem, **est["at_mean"], "at_low": est["at_low"],
                         "at_high": est["at_high"]}
    return DirtyRates(out, window_ns, confidence, precision, exact, bandwidth_bps, downtime_ns)


def _last_frame(series: list[TargetSeries], t: TargetRate) -> int:
    """The memory a migration sends first: the rate part's resident pages, last window."""
    s = next(x for x in series if x.pid == t.pid)
    for w in reversed(s.windows):
        for p in w.parts:
            if p.name == t.rate_part:
                return (p.population + p.new_pages) * PAGE
    return 0


# -- output ------------------------------------------------------------------------


def overlaps_next(res: DirtyRates, i: int) -> bool:
    """The interval of rank i+1 overlaps the next one's: the order may be wrong."""
    if i + 1 >= len(res.targets):
        return False
    a, b = res.targets[i].rate, res.targets[i + 1].rate
    return a.high_bps >= b.low_bps


def to_json(res: DirtyRates, record: str | None = None) -> dict:
    doc = {
        "record": record, "method": "dirty-exact" if res.exact else "dirty-sample",
        "definition": DEFINITION, "window_ns": res.window_ns, "confidence": res.confidence,
        "precision": res.precision, "bandwidth_bps": res.bandwidth_bps,
        "downtime_ns": res.downtime_ns if res.bandwidth_bps is not None else None,
        "targets": [],
    }
    for i, t in enumerate(res.targets):
        r = t.rate
        doc["targets"].append({
            "rank": i + 1, "pid": t.pid, "name": t.name, "mean_bps": r.mean_bps,
            "interval": {"low_bps": r.low_bps, "high_bps": r.high_bps,
                         "confidence": res.confidence},
            "window_ns": t.window_ns, "windows": r.windows, "converged": t.converged,
            "converged_after_ns": t.converged_after_ns if t.converged_after_ns >= 0 else None,
            "overlaps_next": overlaps_next(res, i), "rate_of": t.rate_part, "vmm": t.vmm,
            "parts": [{"name": p.name, "mean_bps": p.mean_bps, "low_bps": p.low_bps,
                       "high_bps": p.high_bps, "resident_bytes": p.resident_bytes,
                       "sampled_pages": p.sampled_pages, "windows": p.windows,
                       "exact_windows": p.exact_windows, "unobserved_spans": p.unobserved}
                      for p in t.parts],
            "precopy": t.precopy,
            "series": [{"elapsed_ns": int(e), "bps": float(b)}
                       for e, b in zip(t.elapsed_ns, r.series_bps, strict=False)],
        })
    return doc


def fmt_rate(bps: float) -> str:
    return f"{fmt_size(bps)}/s"


def _interval(p: PartRate) -> str:
    return f"{fmt_rate(p.low_bps)} .. {fmt_rate(p.high_bps)}"


def _sample(p: PartRate) -> str:
    if p.windows and p.exact_windows == p.windows:
        return "every page"
    frame = p.resident_bytes / PAGE
    share = p.sampled_pages / frame if frame else 0.0
    return f"{p.sampled_pages:.0f} pages ({share:.0%})"


def _precopy_text(pc: dict) -> str:
    if not pc["converges"]:
        return "does not converge (dirties faster than the bandwidth)"
    return (f"converges: {pc['rounds']} round(s), total {fmt_duration_ns(pc['total_ns'])}, "
            f"downtime {fmt_duration_ns(pc['downtime_ns'])}")


def to_text(res: DirtyRates, header: list[str] | None = None) -> str:
    from udamon.report.common import render_table

    lines = list(header or [])
    how = ("exact: every page write-protected, written pages counted and protected again "
           "at the end of each window (PAGEMAP_SCAN with PM_SCAN_WP_MATCHING)" if res.exact
           else "sampled: a uniform random sample of the resident pages write-protected at "
                "the start of each window, checked at its end (sized like QEMU's sample-pages, "
                "grown as the share seen needs; a dense sample becomes the exact count)")
    lines.append(f"dirty rate: {DEFINITION}; window {fmt_duration_ns(res.window_ns)}")
    lines.append(f"how: {how}")
    lines.append(f"interval: {res.confidence:.0%} confidence; converged = 3+ windows and the "
                 f"interval within x{res.precision:g} of the estimate")
    lines.append("targets, slowest dirtier first (rank 1 = best live-migration candidate):")
    table = [["rank", "pid", "name", "rate", f"{res.confidence:.0%} interval", "windows",
              "sample", "converged"]]
    for i, t in enumerate(res.targets):
        r = t.rate
        conv = (f"after {fmt_duration_ns(t.converged_after_ns)}" if t.converged_after_ns >= 0
                else "no")
        table.append([str(i + 1), str(t.pid), t.name, fmt_rate(r.mean_bps), _interval(r),
                      str(r.windows), _sample(r), conv])
    lines += render_table(table, left=3)
    for i in range(len(res.targets) - 1):
        if overlaps_next(res, i):
            a, b = res.targets[i], res.targets[i + 1]
            lines.append(f"note: the intervals of ranks {i + 1} (pid {a.pid}) and {i + 2} "
                         f"(pid {b.pid}) overlap: their order is not certain")
    for t in res.targets:
        if t.vmm:
            ram = sum(e - s for s, e in t.vmm.get("ram", []))
            lines.append(f"pid {t.pid}: {t.vmm['kind']} VMM; guest RAM {fmt_size(ram)} "
                         f"({t.vmm['how']}): {fmt_rate(t.rate.mean_bps)}, "
                         f"{fmt_size(t.rate.resident_bytes)} resident")
            for p in t.parts:
                if p.name != t.rate_part:
                    lines.append(f"pid {t.pid}: the VMM's own memory ({p.name}, not migrated "
                                 f"as guest RAM): {fmt_rate(p.mean_bps)} "
                                 f"[{_interval(p)}], {fmt_size(p.resident_bytes)} resident")
        elif len(t.parts) > 1:
            for p in t.parts:
                if p.name != t.rate_part:
                    lines.append(f"pid {t.pid}: outside the ranges given ({p.name}): "
                                 f"{fmt_rate(p.mean_bps)}")
        if t.rate.resident_bytes == 0:
            lines.append(f"pid {t.pid}: none of the memory its rate counts could be watched "
                         "(nothing resident, or not anonymous/shmem memory: hugetlbfs is not "
                         "supported): its rate says nothing")
        unobs = sum(p.unobserved for p in t.parts)
        if unobs:
            lines.append(f"pid {t.pid}: {unobs} mapping-window(s) could not be observed (the "
                         "mapping changed between reading and protecting it)")
    if res.bandwidth_bps is not None:
        lines.append(f"pre-copy live migration at {fmt_rate(res.bandwidth_bps)}, downtime limit "
                     f"{fmt_duration_ns(res.downtime_ns)} (QEMU's model: round 1 sends the "
                     "resident memory, each next round what the previous one dirtied):")
        for i, t in enumerate(res.targets):
            pc = t.precopy
            if pc is None:
                continue
            lo, hi = pc["at_low"], pc["at_high"]
            rng = ""
            if hi["converges"] and lo["converges"] and hi["total_ns"] != lo["total_ns"]:
                rng = (f" (interval: {fmt_duration_ns(lo['total_ns'])} .. "
                       f"{fmt_duration_ns(hi['total_ns'])})")
            elif pc["converges"] and not hi["converges"]:
                rng = " (not at the interval's high end)"
            elif not pc["converges"] and lo["converges"]:
                rng = " (would at the interval's low end)"
            lines.append(f"  {i + 1}. pid {t.pid}: {fmt_size(pc['memory_bytes'])} resident; "
                         f"{_precopy_text(pc)}{rng}")
    return "\n".join(lines) + "\n"

