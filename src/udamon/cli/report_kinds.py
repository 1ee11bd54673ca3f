"""The report kinds beyond ``access``, for ``udamon report KIND``.

``KINDS`` maps a kind to ``(help, formats, add_args(parser), run(args, record) ->
int)``.  ``add_args`` adds only the kind's own options; the common ones are
expected from ``cli/report.py``: ``-i/--input``, ``--format`` (choices: the
kind's ``formats``, so that argparse refuses the others before any option that
only one format has confuses it), ``--pid``, ``--top``, ``--salvage``.  ``--output``
and ``--color`` are added here by the kinds that use them.  ``run`` writes
text or JSON to stdout and images to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from udamon.cli.common import typed
from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report import dirty, heatmap, ksm, numa, sharing, wss
from udamon.report.common import check_probe
from udamon.units import parse_duration_ns


def _formats(a: argparse.Namespace, kind: str, allowed: tuple[str, ...]) -> str:
    fmt = getattr(a, "format", None) or "text"
    if fmt not in allowed:
        raise UsageError(f"report {kind} supports --format {', '.join(allowed)}, not {fmt}")
    return fmt


def _positive(name: str, v: int | None) -> None:
    if v is not None and v <= 0:
        raise UsageError(f"{name} must be positive, got {v}")


def _emit_json(doc: dict) -> int:
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _probe_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--probe", metavar="NAME", default=None,
                   help=f"use this probe's hits instead of nr_accesses ({what})")


# -- heatmap ----------------------------------------------------------------------


def _heatmap_args(p: argparse.ArgumentParser) -> None:
    _probe_arg(p, "e.g. write")
    p.add_argument("--resol-addr", type=int, metavar="N",
                   help="address columns (default 60 for text, 600 for png/json)")
    p.add_argument("--resol-time", type=int, metavar="N",
                   help="time rows (default 30 for text, 300 for png/json)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colours in text (default: when stdout is a terminal)")
    p.add_argument("--output", "-o", metavar="FILE", help="image file for --format png")
    p.add_argument("--size", metavar="WxH", default="1200x700",
                   help="png size in pixels (default 1200x700)")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must be WIDTHxHEIGHT in pixels, got {text!r}") from None
    if not (200 <= w <= 10000 and 150 <= h <= 10000):
        raise UsageError(f"--size {text}: width 200..10000 and height 150..10000 pixels")
    return w, h


def _heatmap_run(a: argparse.Namespace, rec: Record) -> int:
    fmt = _formats(a, "heatmap", ("text", "json", "png"))
    probe = check_probe(rec, getattr(a, "probe", None))
    cols = getattr(a, "resol_addr", None)
    rows = getattr(a, "resol_time", None)
    _positive("--resol-addr", cols)
    _positive("--resol-time", rows)
    if (cols or 0) > 10000 or (rows or 0) > 10000:
        raise UsageError("--resol-addr and --resol-time must be at most 10000")
    out = getattr(a, "output", None)
    if fmt == "png" and not out:
        raise UsageError("--format png needs --output FILE")
    if fmt != "png" and out:
        raise UsageError("--output is for --format png; text and json go to stdout")
    size = _size(getattr(a, "size", "1200x700"))
    text = fmt == "text"
    h = heatmap.build(rec, getattr(a, "pid", None), probe, cols or (60 if text else 600),
                      rows or (30 if text else 300))
    if fmt == "json":
        return _emit_json(heatmap.to_json(rec, h))
    if fmt == "png":
        try:
            heatmap.to_png(rec, h, out, *size)
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"udamon: wrote {out}", file=sys.stderr)
        return 0
    color = getattr(a, "color", "auto")
    sys.stdout.write(heatmap.to_text(rec, h, color == "always"
                                     or (color == "auto" and sys.stdout.isatty())))
    return 0


# -- wss ----------------------------------------------------------------------------


def _wss_args(p: argparse.ArgumentParser) -> None:
    _probe_arg(p, "e.g. write: the working set of writes")
    p.add_argument("--min-accesses", type=int, default=1, metavar="N",
                   help="a region is in the working set when its count is >= N (default 1)")
    p.add_argument("--resol-time", type=int, metavar="N", default=20,
                   help="rows of the over-time chart (default 20)")


def _wss_run(a: argparse.Namespace, rec: Record) -> int:
    fmt = _formats(a, "wss", ("text", "json"))
    probe = check_probe(rec, getattr(a, "probe", None))
    _positive("--min-accesses", getattr(a, "min_accesses", 1))
    _positive("--resol-time", getattr(a, "resol_time", 20))
    res = wss.compute(rec, getattr(a, "pid", None), probe, getattr(a, "min_accesses", 1))
    if fmt == "json":
        return _emit_json(wss.to_json(rec, res))
    sys.stdout.write(wss.to_text(rec, res, getattr(a, "resol_time", 20)))
    return 0


# -- ksm ----------------------------------------------------------------------------


def _ksm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-age", metavar="DUR", type=typed(parse_duration_ns, "duration"),
                   help="unwritten for at least this long (default: 10 s or half the "
                        "record, whichever is smaller)")


def _ksm_run(a: argparse.Namespace, rec: Record) -> int:
    from udamon.report import ksm_advice
    from udamon.report.common import pick_pids, record_line

    fmt = _formats(a, "ksm", ("text", "json"))
    top = getattr(a, "top", None)
    if ksm_advice.is_advice_record(rec):
        if getattr(a, "min_age", None) is not None:
            raise UsageError("--min-age: a record of udamon ksm-advise holds the advice made "
                             "with its own --min-age")
        pick_pids(rec, getattr(a, "pid", None))
        adv, applied = ksm_advice.advice_from_record(rec, getattr(a, "pid", None))
        if fmt == "json":
            doc = ksm_advice.to_json(adv, rec.path)
            for t in doc["targets"]:
                if t["pid"] in applied:
                    t["apply"] = applied[t["pid"]]
            return _emit_json(doc)
        sys.stdout.write(ksm_advice.to_text(adv, [record_line(rec)], top or 20))
        return 0
    res = ksm.compute(rec, getattr(a, "pid", None), getattr(a, "min_age", None))
    if fmt == "json":
        return _emit_json(ksm.to_json(rec, res))
    sys.stdout.write(ksm.to_text(rec, res, top or 20))
    return 0


# -- dirty --------------------------------------------------------------------------


def _dirty_args(p: argparse.ArgumentParser) -> None:
    from udamon.cli.common import duration_arg
    from udamon.cli.dirty_rate import parse_rate

    p.add_argument("--bandwidth", metavar="RATE", type=typed(parse_rate, "rate"),
                   help="add QEMU's pre-copy estimate at this bandwidth (e.g. 10Gbit/s); "
                        "records of udamon dirty-rate")
    p.add_argument("--downtime", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=None, help="downtime limit of the pre-copy estimate (default 300ms)")


def _dirty_run(a: argparse.Namespace, rec: Record) -> int:
    from udamon.report import dirty_record

    fmt = _formats(a, "dirty", ("text", "json"))
    if dirty_record.is_dirty_record(rec):
        return _dirty_rate_run(a, rec, fmt)
    if getattr(a, "bandwidth", None) is not None or getattr(a, "downtime", None) is not None:
        raise UsageError("--bandwidth/--downtime need a record of 'udamon dirty-rate' "
                         f"({rec.path} was made by 'udamon record')")
    res = dirty.compute(rec, getattr(a, "pid", None))
    if fmt == "json":
        return _emit_json(dirty.to_json(rec, res))
    sys.stdout.write(dirty.to_text(rec, res))
    return 0


def _dirty_rate_run(a: argparse.Namespace, rec: Record, fmt: str) -> int:
    from udamon.report import dirty_rate, dirty_record, precopy
    from udamon.report.common import pick_pids, record_line

    pick_pids(rec, getattr(a, "pid", None))
    est = rec.header["estimator"]
    series = dirty_record.series_from_record(rec, getattr(a, "pid", None))
    down = getattr(a, "downtime", None)
    res = dirty_rate.compute(series, window_ns=int(est.get("window_ns", 1_000_000_000)),
                             confidence=float(est.get("confidence", 0.95)),
                             precision=float(est.get("precision") or 1.25),
                             exact=est.get("mode") == "exact",
                             bandwidth_bps=getattr(a, "bandwidth", None),
                             downtime_ns=down if down is not None else precopy.DEFAULT_DOWNTIME_NS)
    if fmt == "json":
        return _emit_json(dirty_rate.to_json(res, rec.path))
    sys.stdout.write(dirty_rate.to_text(res, [record_line(rec)]))
    return 0


# -- sharing ------------------------------------------------------------------------


def _sharing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", type=int, metavar="N",
                   help="thread groups to suggest (default: the number of node:<n> probes, "
                        "at least 2)")


def _sharing_run(a: argparse.Namespace, rec: Record) -> int:
    fmt = _formats(a, "sharing", ("text", "json"))
    _positive("--groups", getattr(a, "groups", None))
    top = getattr(a, "top", None)
    res = sharing.compute(rec, getattr(a, "pid", None), getattr(a, "groups", None))
    if fmt == "json":
        return _emit_json(sharing.to_json(rec, res))
    sys.stdout.write(sharing.to_text(rec, res, top or 10))
    return 0


# -- numa ---------------------------------------------------------------------------


def _numa_args(p: argparse.ArgumentParser) -> None:
    pass


def _numa_run(a: argparse.Namespace, rec: Record) -> int:
    fmt = _formats(a, "numa", ("text", "json"))
    top = getattr(a, "top", None)
    res = numa.compute(rec, getattr(a, "pid", None))
    if fmt == "json":
        return _emit_json(numa.to_json(rec, res))
    sys.stdout.write(numa.to_text(rec, res, top or 10))
    return 0


Kind = tuple[str, tuple[str, ...], Callable[[argparse.ArgumentParser], None],
             Callable[[argparse.Namespace, Record], int]]

TEXT_JSON = ("text", "json")

KINDS: dict[str, Kind] = {
    "heatmap": ("time x address heat of nr_accesses or a probe (text, json, png)",
                ("text", "json", "png"), _heatmap_args, _heatmap_run),
    "wss": ("working set size over time and its distribution", TEXT_JSON, _wss_args,
            _wss_run),
    "ksm": ("KSM candidates: memory not written for a long time (needs write counts)",
            TEXT_JSON, _ksm_args, _ksm_run),
    "dirty": ("dirty rate per target, slowest dirtier first (live migration)", TEXT_JSON,
              _dirty_args, _dirty_run),
    "sharing": ("bytes shared between CPUs and threads, thread grouping suggestions",
                TEXT_JSON, _sharing_args, _sharing_run),
    "numa": ("accesses per node (node:<n> probes) vs page locations: local/remote",
             TEXT_JSON, _numa_args, _numa_run),
}
