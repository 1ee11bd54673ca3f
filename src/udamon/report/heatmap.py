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
from udamon.units import fmt_duration_ns, fmt_size

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
    mark = [" "] * cols
    ticks = _addr_ticks(h, cols)
    for c, _ in ticks:
        mark[c] = "|"
    for pos, _, _ in gaps:
        mark[min(int(round(pos / per_col)), cols - 1)] = "/"
    lines.append(" " * lw + " +" + "".join(mark) + "+")
    # labels: greedy placement on up to 3 lines
    rows_txt: list[list[str]] = []
    for c, text in ticks:
        for line in rows_txt:
            if all(ch == " " for ch in line[c:c + len(text) + 1]):
                break
        else:
            if len(rows_txt) == 3:
                continue
            line = [" "] * (cols + 20)
            rows_txt.append(line)
        line[c:c + len(text)] = text
    for line in rows_txt:
        lines.append(" " * (lw + 2) + "".join(line).rstrip())
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
    lines.append(f"  0 = 0, level k = up to {step:.3g}*k; 9 = up to {vmax:.3g} "
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
        "matrix": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                   for row in h.matrix],
    }


def to_png(rec: Record, h: Heatmap, path: str, width: int = 1200, height: int = 700) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    dpi = 100
    fig, ax = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi)
    try:
        length = h.axis.length
        t = h.t_edges / 1e9
        cmap = matplotlib.colormaps["inferno"].copy()
        cmap.set_bad("#d9d9d9")
        m = np.ma.masked_invalid(h.matrix)
        im = ax.imshow(m, aspect="auto", origin="upper", interpolation="nearest", cmap=cmap,
                       extent=(0, length, t[-1], t[0]), vmin=0, vmax=_vmax(h))
        cb = fig.colorbar(im, ax=ax, pad=0.02)
        cb.set_label(_value_name(rec, h))
        for pos, a, b in h.axis.gaps():
            ax.axvline(pos, color="#40c0ff", linestyle="--", linewidth=1)
            ax.annotate(f"gap {fmt_size(b - a)}", (pos, t[0]), xytext=(3, -12),
                        textcoords="offset points", color="#40c0ff", fontsize=8)
        ticks = np.linspace(0, length, 7)
        for off in h.axis.offsets:
            if np.min(np.abs(ticks - off)) > length * 0.04:
                ticks = np.append(ticks, off)
        ticks = np.sort(ticks)
        ax.set_xticks(ticks)
        end = h.axis.segments[-1][1]
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda x, _: f"{end if x >= length else int(h.axis.to_addr(x)) // 4096 * 4096:#x}"))
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
        ax.set_xlabel(f"address ({fmt_size(length)} mapped"
                      + (", unmapped gaps cut out" if h.axis.gaps() else "") + ")")
        ax.set_ylabel("time (s)")
        title = (f"{rec.path.rsplit('/', 1)[-1]}: target {h.pid} {target_name(rec, h.pid)}"
                 f" - {describe_source(h.probe)}")
        if rec.coverage == "unknown":
            title += "\n(coverage unknown: 0 = not observed)"
        ax.set_title(title)
        fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.14)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
