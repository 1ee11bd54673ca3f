"""Each report kind's own command-line options, and how they become the kind's options
(udamon.report.kind: the kinds themselves).  ``OPTIONS`` maps a kind to ``(add_args
(parser), options(args, record) -> the kind's options dataclass)``; ``options``
checks what only the command line can get wrong and names the options it checks.
The common options (-i, --format, --pid, --top, --salvage) are cli/report.py's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from typing import Any

from udamon.cli.common import duration_arg, typed
from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report import access, dirty, heatmap, ksm, numa, sharing, wss
from udamon.report.common import check_probe, pick_pids
from udamon.units import parse_duration_ns


def _positive(name: str, v: int | None) -> None:
    if v is not None and v <= 0:
        raise UsageError(f"{name} must be positive, got {v}")


def _probe_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--probe", metavar="NAME", default=None,
                   help=f"use this probe's hits instead of nr_accesses ({what})")


# -- access ---------------------------------------------------------------------------


def _access_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", default="last", metavar="last|all|busiest|sum|N",
                   help="which aggregation snapshot(s): last (default), all, busiest (the one "
                        "with the most reports), sum (nr_accesses and probe hits summed over "
                        "the whole record, on the finest cut of the regions: the view for "
                        "bursty primitives such as hint, whose snapshots are mostly empty), "
                        "or an index (negative counts from the end)")
    p.add_argument("--columns", metavar="NAME[,NAME]", type=lambda t: [
                   x.strip() for x in t.split(",") if x.strip()],
                   help="probe columns to show: names or globs, e.g. 'write,thread:*' "
                        "(default: those that fit the terminal, read/write and locality "
                        "first)")
    p.add_argument("--wide", action="store_true",
                   help="every probe column, however wide the table gets")
    p.add_argument("--sort", default="address", metavar="KEY",
                   help="order of regions: address (default), size, nr_accesses, age, "
                        "or probe:NAME (hottest first)")


def _access_options(a: argparse.Namespace, rec: Record) -> access.AccessOptions:
    if a.snapshot not in ("last", "all", "busiest", "sum"):
        try:
            int(a.snapshot)
        except ValueError:
            raise UsageError(f"--snapshot must be last, all, busiest, sum or an integer, "
                             f"got {a.snapshot!r}") from None
    if a.sort not in access.SORT_KEYS:
        name = a.sort.removeprefix("probe:")
        if not a.sort.startswith("probe:") or name not in rec.probe_names:
            raise UsageError(f"--sort {a.sort!r}: use one of {', '.join(access.SORT_KEYS)} "
                             f"or probe:NAME with a probe of the record "
                             f"({', '.join(rec.probe_names) or 'it has none'})")
    pick_pids(rec, a.pid)  # no snapshots to show is an error, as for the other kinds
    if a.columns is not None and not a.columns:
        raise UsageError("--columns needs probe names or globs, e.g. write,thread:*")
    if a.columns and a.wide:
        raise UsageError("--columns picks columns and --wide shows all: give one")
    width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 120
    return access.AccessOptions(a.snapshot, a.sort, a.pid, a.top, a.columns, a.wide,
                                max(width, 80))


# -- heatmap --------------------------------------------------------------------------


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


def _heatmap_options(a: argparse.Namespace, rec: Record) -> heatmap.HeatmapOptions:
    cols, rows = a.resol_addr, a.resol_time
    _positive("--resol-addr", cols)
    _positive("--resol-time", rows)
    if (cols or 0) > 10000 or (rows or 0) > 10000:
        raise UsageError("--resol-addr and --resol-time must be at most 10000")
    if a.format == "png" and not a.output:
        raise UsageError("--format png needs --output FILE")
    if a.format != "png" and a.output:
        raise UsageError("--output is for --format png; text and json go to stdout")
    text = a.format == "text"
    return heatmap.HeatmapOptions(
        a.pid, check_probe(rec, a.probe), cols or (60 if text else 600),
        rows or (30 if text else 300),
        a.color == "always" or (a.color == "auto" and sys.stdout.isatty()), _size(a.size))


# -- the others -----------------------------------------------------------------------


def _wss_args(p: argparse.ArgumentParser) -> None:
    _probe_arg(p, "e.g. write: the working set of writes")
    p.add_argument("--min-accesses", type=int, default=1, metavar="N",
                   help="a region is in the working set when its count is >= N (default 1)")
    p.add_argument("--resol-time", type=int, metavar="N", default=20,
                   help="rows of the over-time chart (default 20)")


def _wss_options(a: argparse.Namespace, rec: Record) -> wss.WssOptions:
    _positive("--min-accesses", a.min_accesses)
    _positive("--resol-time", a.resol_time)
    return wss.WssOptions(a.pid, check_probe(rec, a.probe), a.min_accesses, a.resol_time)


def _ksm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-age", metavar="DUR", type=typed(parse_duration_ns, "duration"),
                   help="unwritten for at least this long (default: 10 s or half the "
                        "record, whichever is smaller)")


def _dirty_args(p: argparse.ArgumentParser) -> None:
    from udamon.cli.dirty_rate import parse_rate

    p.add_argument("--bandwidth", metavar="RATE", type=typed(parse_rate, "rate"),
                   help="add QEMU's pre-copy estimate at this bandwidth (e.g. 10Gbit/s); "
                        "records of udamon dirty-rate")
    p.add_argument("--downtime", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=None, help="downtime limit of the pre-copy estimate (default 300ms)")


def _sharing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--groups", type=int, metavar="N",
                   help="thread groups to suggest (default: the number of node:<n> probes, "
                        "at least 2)")


def _sharing_options(a: argparse.Namespace, rec: Record) -> sharing.SharingOptions:
    _positive("--groups", a.groups)
    return sharing.SharingOptions(a.pid, a.top, a.groups)


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


OPTIONS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                         Callable[[argparse.Namespace, Record], Any]]] = {
    "access": (_access_args, _access_options),
    "heatmap": (_heatmap_args, _heatmap_options),
    "wss": (_wss_args, _wss_options),
    "ksm": (_ksm_args, lambda a, rec: ksm.KsmOptions(a.pid, a.top, a.min_age)),
    "dirty": (_dirty_args, lambda a, rec: dirty.DirtyOptions(a.pid, a.bandwidth, a.downtime)),
    "sharing": (_sharing_args, _sharing_options),
    "numa": (_no_args, lambda a, rec: numa.NumaOptions(a.pid, a.top)),
}

# what the kinds call their options, as the command line names them
OPTION_NAMES = {"min_age_ns": "--min-age", "bandwidth_bps": "--bandwidth/--downtime"}
