"""``report heatmap``: time x address heat of nr_accesses or of a probe's hits.

The address axis is the union of the target's regions over the record, with
large unmapped gaps cut out (marked on the axis) so that small buffers far
apart stay visible; each column is the byte-weighted mean over its bytes.
Rows are equal slices of time; a row is the time-weighted mean of the
snapshots whose interval ends in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udamon.core.names import union_tables
from udamon.record.reader import Record
from udamon.report.common import (
    AddrAxis,
    aggr_samples,
    describe_source,
    notes,
    pick_pid,
    t0_of,
    target_name,
    values,
)
from udamon.report.kind import ReportKind
from udamon.units import fmt_duration_ns, fmt_num, fmt_size

# 256-colour background palette for levels 0..9 (dark blue -> yellow -> red).
PALETTE = (234, 17, 19, 25, 31, 37, 71, 184, 208, 196)


@dataclass
class Heatmap:
    pid: int
    probe: str | None
    axis: AddrAxis
    t_edges: np.ndarray  # ns since the record start, rows + 1
    matrix: np.ndarray  # rows x cols, NaN where unmapped / no snapshot
    max_count: int  # the largest possible value (sampling intervals per aggregation)


def build(rec: Record, pid: int | None, probe: str | None, cols: int, rows: int) -> Heatmap:
    pid = pick_pid(rec, pid)
    snaps = rec.snapshots_of(pid)
    axis = AddrAxis.of(snaps)
    t0 = t0_of(rec)
    t_end = max(s.time_ns for s in snaps) - t0
    t_begin = min(s.start_ns for s in snaps) - t0
    rows = max(1, min(rows, len(snaps)))
    t_edges = np.linspace(t_begin, t_end, rows + 1)
    acc = np.zeros((rows, cols))
    wsum = np.zeros((rows, cols))
    for s in snaps:
        r = int(np.clip(np.searchsorted(t_edges, s.time_ns - t0, side="left") - 1, 0, rows - 1))
        line = axis.resample(s, values(s, probe), cols)
        ok = np.isfinite(line)
        w = max(s.time_ns - s.start_ns, 1)
        acc[r, ok] += line[ok] * w
        wsum[r, ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(wsum > 0, acc / np.where(wsum > 0, wsum, 1), np.nan)
    max_count = max(aggr_samples(s) for s in snaps)
    return Heatmap(pid, probe, axis, t_edges, matrix, max_count)


def _vmax(h: Heatmap) -> float:
    m = np.nanmax(h.matrix) if np.isfinite(h.matrix).any() else 0.0
    return float(m) if m > 0 else 1.0


def levels(h: Heatmap) -> np.ndarray:
    """0 for exactly 0, 1..9 in equal steps up to the largest value, -1 unmapped."""
    vmax = _vmax(h)
    m = np.nan_to_num(h.matrix, nan=-1.0)
    lv = np.where(m > 0, 1 + np.minimum(np.floor(m / vmax * 9), 8), 0).astype(int)
    lv[m < 0] = -1
    return lv


def _value_name(rec: Record, h: Heatmap) -> str:
    what = describe_source(h.probe)
    if rec.coverage == "unknown":
        return f"observed hits ({what}) per aggregation"
    return f"{what} per aggregation (max {h.max_count} = every sampling interval)"


def _addr_ticks(h: Heatmap, cols: int) -> list[tuple[int, str]]:
    """(column, label) ticks: every segment start plus evenly spaced ones."""
    ax = h.axis
    per_col = ax.length / cols
    cand = [(int(round(off / per_col)), a) for (a, _), off in zip(ax.segments, ax.offsets,
                                                                   strict=True)]
    for c in range(0, cols, 20):
        cand.append((c, int(ax.to_addr(c * per_col)) // 4096 * 4096))
    cand.append((cols - 1, ax.segments[-1][1]))
    out: dict[int, int] = {}
    for c, a in sorted(cand):
        if all(abs(c - k) >= 4 for k in out) or c in out:
            out.setdefault(min(c, cols - 1), a)
    return [(c, f"{a:#x}") for c, a in sorted(out.items())]


def _place_labels(ticks: list[tuple[int, str]], cols: int, max_lines: int = 3
                  ) -> tuple[list[tuple[int, str]], list[str]]:
    """Greedy placement of tick labels, each starting under its column, on up to
    ``max_lines`` lines with at least one blank between labels; a label that
    fits nowhere is dropped (and its tick not drawn) rather than run into another.
    Returns the ticks kept and the label lines."""
    rows: list[list[str]] = []
    placed = []
    for c, text in ticks:
        lo, hi = max(c - 1, 0), c + len(text) + 1  # the label plus a blank either side
        line = next((ln for ln in rows if all(ch == " " for ch in ln[lo:hi])), None)
        if line is None:
            if len(rows) == max_lines:
                continue
            line = [" "] * (cols + len(text) + 2)
            rows.append(line)
        if len(line) < c + len(text):
            line.extend(" " * (c + len(text) - len(line)))
        line[c:c + len(text)] = text
        placed.append((c, text))
    return placed, ["".join(ln).rstrip() for ln in rows]


def to_text(rec: Record, h: Heatmap, color: bool) -> str:
    rows, cols = h.matrix.shape
    lines = [f"heatmap of {describe_source(h.probe)}, target {h.pid} "
             f"{target_name(rec, h.pid)}: {rec.path}"]
    lines += notes(rec)
    gaps = h.axis.gaps()
    lines.append(f"address: {fmt_size(h.axis.length)} mapped in {cols} columns "
                 f"({fmt_size(h.axis.length / cols)} each)"
                 + (f"; {len(gaps)} unmapped gap(s) cut out, marked '/' on the axis"
                    if gaps else ""))
    lines.append(f"time: {fmt_duration_ns(h.t_edges[-1] - h.t_edges[0])} in {rows} rows "
                 f"({fmt_duration_ns((h.t_edges[-1] - h.t_edges[0]) / rows)} each)")
    lv = levels(h)
    labels = [fmt_duration_ns(t) if t else "0 s" for t in h.t_edges[:-1]]
    lw = max(len(x) for x in labels)
    for r in range(rows):
        if color:
            cells = []
            prev = None
            for v in lv[r]:
                code = "\x1b[0m" if v < 0 else f"\x1b[48;5;{PALETTE[v]}m"
                cells.append(("" if code == prev else code) + " ")
                prev = code
            body = "".join(cells) + "\x1b[0m"
        else:
            body = "".join(" " if v < 0 else str(v) for v in lv[r])
        lines.append(f"{labels[r].rjust(lw)} |{body}|")
    per_col = h.axis.length / cols
    placed, label_lines = _place_labels(_addr_ticks(h, cols), cols)
    mark = [" "] * cols
    for c, _ in placed:
        mark[c] = "|"
    for pos, _, _ in gaps:
        mark[min(int(round(pos / per_col)), cols - 1)] = "/"
    lines.append(" " * lw + " +" + "".join(mark) + "+")
    lines += [" " * (lw + 2) + line for line in label_lines]
    for pos, a, b in gaps:
        lines.append(f"  gap at column {min(int(round(pos / per_col)), cols - 1)}: "
                     f"{a:#x}-{b:#x} ({fmt_size(b - a)}) not mapped, cut out")
    vmax = _vmax(h)
    step = vmax / 9
    if color:
        legend = " ".join(f"\x1b[48;5;{PALETTE[i]}m {i} \x1b[0m" for i in range(10))
    else:
        legend = " ".join(str(i) for i in range(10))
    lines.append(f"legend: {legend}  (blank: not mapped)")
    lines.append(f"  0 = 0, level k = up to {fmt_num(step)}*k; 9 = up to {fmt_num(vmax)} "
                 f"{_value_name(rec, h)}")
    return "\n".join(lines) + "\n"


def to_json(rec: Record, h: Heatmap) -> dict:
    pos = h.axis.edges(h.matrix.shape[1])
    addr = h.axis.to_addr(pos)
    addr[-1] = h.axis.segments[-1][1]
    return {
        "record": rec.path, "pid": h.pid, "value": describe_source(h.probe),
        "coverage": rec.coverage, "max_count": h.max_count,
        "time_edges_ns": [int(round(t)) for t in h.t_edges],
        "addr_edges": [int(round(a)) for a in addr],
        "segments": [[a, b] for a, b in h.axis.segments],
        # the mappings on the axis, from the whole record (None: no names, e.g. replay)
        "mappings": _axis_mappings(rec, h),
        "matrix": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                   for row in h.matrix],
    }


def _axis_mappings(rec: Record, h: Heatmap) -> list[dict] | None:
    """The named spans of the target's tables (all snapshots) that lie on the axis."""
    table = union_tables([s.names for s in rec.snapshots_of(h.pid)])
    if table is None:
        return None
    out = []
    for s, e, name in table:
        for a, b in h.axis.segments:
            lo, hi = max(s, a), min(e, b)
            if lo < hi:
                out.append({"start": lo, "end": hi, "name": name})
    return sorted(out, key=lambda d: (d["start"], d["end"], d["name"]))


def _tick_label(h: Heatmap, pos: float) -> str:
    """Address at an axis position: the last byte's end at the right edge, else the
    page it falls in."""
    if pos >= h.axis.length:
        return f"{h.axis.segments[-1][1]:#x}"
    return f"{int(h.axis.to_addr(pos)) // 4096 * 4096:#x}"


def _png_ticks(h: Heatmap, min_gap: float) -> list[float]:
    """Axis positions for address ticks, at least ``min_gap`` apart (bytes of axis):
    the two ends, then the segment starts after cut-out gaps, then evenly spaced
    ones; a candidate too close to one already taken is dropped."""
    length = float(h.axis.length)
    n = max(int(length // max(min_gap, 1.0)), 1)
    cand = [0.0, length, *map(float, h.axis.offsets[1:]),
            *np.linspace(0.0, length, n + 1)[1:-1].tolist()]
    ticks: list[float] = []
    for c in cand:
        if all(abs(c - t) >= min_gap for t in ticks):
            ticks.append(c)
    return sorted(ticks)


def to_png(rec: Record, h: Heatmap, path: str, width: int = 1200, height: int = 700) -> None:
    """Draw with constrained layout (every label inside the figure at any --size);
    address ticks are thinned by the measured width of a label so they never
    overlap, and gap labels stay inside the plot, staggered when close."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fs = 8 if min(width, height) < 600 else 9
    fig, ax = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    try:
        length = float(h.axis.length)
        t = h.t_edges / 1e9
        cmap = matplotlib.colormaps["inferno"].with_extremes(bad="#d9d9d9")
        m = np.ma.masked_invalid(h.matrix)
        im = ax.imshow(m, aspect="auto", origin="upper", interpolation="nearest", cmap=cmap,
                       extent=(0, length, t[-1], t[0]), vmin=0, vmax=_vmax(h))
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        cb.ax.tick_params(labelsize=fs)
        ax.tick_params(labelsize=fs)
        ax.set_xlabel(f"address ({fmt_size(length)} mapped"
                      + (", unmapped gaps cut out" if h.axis.gaps() else "") + ")",
                      fontsize=fs + 1)
        ax.set_ylabel("time (s)", fontsize=fs + 1)
        title = (f"{rec.path.rsplit('/', 1)[-1]}: target {h.pid} {target_name(rec, h.pid)}"
                 f" - {describe_source(h.probe)}")
        if rec.coverage == "unknown":
            title += "\n(coverage unknown: 0 = not observed)"
        ax.set_title(title, fontsize=fs + 2)
        # lay out once with the widest tick label to learn the plot's size in pixels
        widest = max((_tick_label(h, p) for p in (0.0, length)), key=len)
        ax.set_xticks([0.0, length], [widest, widest])
        cb.set_label(_value_name(rec, h), fontsize=fs + 1)
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        box = ax.get_window_extent(r)
        label_px = max(lb.get_window_extent(r).width for lb in ax.get_xticklabels())
        per_px = length / max(box.width, 1.0)
        ticks = _png_ticks(h, (label_px + 2 * fs) * per_px)
        ax.set_xticks(ticks, [_tick_label(h, p) for p in ticks])
        # wrap the colour bar's label to the plot's height
        chars = max(int(box.height / (0.6 * (fs + 1) * dpi / 72)), 20)
        cb.set_label("\n".join(textwrap.wrap(_value_name(rec, h), chars)), fontsize=fs + 1)
        # gap markers: the label sits on the side of the line with more room,
        # one row lower when it would run into the previous one
        rows_end: list[float] = []
        for pos, a, b in h.axis.gaps():
            ax.axvline(pos, color="#40c0ff", linestyle="--", linewidth=1)
            text = f"gap {fmt_size(b - a)}"
            gap_w = len(text) * 0.6 * fs * dpi / 72 * per_px
            left = pos > length / 2
            lo, hi = (pos - gap_w - 3 * per_px, pos) if left else (pos, pos + gap_w + 3 * per_px)
            row = next((i for i, e in enumerate(rows_end) if e < lo), len(rows_end))
            if row == len(rows_end):
                rows_end.append(hi)
            rows_end[row] = hi
            ax.annotate(text, (pos, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-3 if left else 3, -4 - 1.4 * fs * (row + 1)),
                        textcoords="offset points", ha="right" if left else "left",
                        color="#40c0ff", fontsize=fs, annotation_clip=True,
                        bbox={"boxstyle": "square,pad=0.1", "fc": "black", "ec": "none",
                              "alpha": 0.6})
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


# -- the kind ---------------------------------------------------------------------


@dataclass
class HeatmapOptions:
    pid: int | None = None
    probe: str | None = None  # this probe's hits instead of nr_accesses
    cols: int = 60  # address columns
    rows: int = 30  # time rows
    color: bool = False  # ANSI colours in text
    size: tuple[int, int] = (1200, 700)  # png pixels


KIND = ReportKind(
    "heatmap", "time x address heat of nr_accesses or a probe (text, json, png)",
    ("text", "json", "png"), HeatmapOptions,
    lambda rec, o: build(rec, o.pid, o.probe, o.cols, o.rows),
    lambda rec, h, o: to_text(rec, h, o.color), lambda rec, h, o: to_json(rec, h),
    lambda rec, h, o, path: to_png(rec, h, path, *o.size))
