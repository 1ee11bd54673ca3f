"""``udamon report KIND``: read a record and answer a question about it.

Every kind has its own subparser with the common options (-i, --format with
the formats that kind writes, --pid, --top, --salvage) plus its own; kinds
other than ``access`` live in ``cli/report_kinds.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from udamon.cli.common import open_record
from udamon.cli.report_kinds import KINDS as MORE_KINDS
from udamon.errors import UsageError
from udamon.record.reader import Record
from udamon.report import access
from udamon.report.common import pick_pids


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


def _access_run(a: argparse.Namespace, rec: Record) -> int:
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
    opts = access.AccessOptions(a.snapshot, a.sort, a.pid, a.top, a.columns, a.wide,
                                max(width, 80))
    try:
        if a.format == "json":
            json.dump(access.to_json(rec, opts), sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(access.to_text(rec, opts))
    except IndexError as e:
        raise UsageError(str(e)) from None
    return 0


KINDS = {
    "access": ("regions table: nr_accesses, age and per-probe hits of each region",
               ("text", "json"), _access_args, _access_run),
    **MORE_KINDS,
}


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="report on a record file",
                       description="Report on a record written by 'udamon record'.  "
                                   "'udamon report KIND --help' tells each kind's options.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="kinds:\n" + "\n".join(f"  {k:<8} {v[0]}" for k, v in KINDS.items()))
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=type(p))
    kinds.required = True
    for name, (help_text, formats, add_args, run) in KINDS.items():
        k = kinds.add_parser(name, help=help_text, description=help_text)
        k.add_argument("-i", "--input", metavar="FILE", required=True,
                       help="record file (udamon's, or a record file of damo 3.4: "
                            "json_compressed, json, perf_script, perf_data)")
        k.add_argument("--format", choices=formats, default="text",
                       help="output format (default text)")
        k.add_argument("--pid", type=int, help="only this target")
        k.add_argument("--top", type=int, metavar="N", help="at most N rows")
        k.add_argument("--salvage", action="store_true",
                       help="read a damaged record up to the damage instead of failing")
        add_args(k)
        k.set_defaults(func=_run, kind_run=run)


def _run(a: argparse.Namespace) -> int:
    if a.top is not None and a.top <= 0:
        raise UsageError("--top must be positive")
    rec = open_record(a.input, a.pid, a.salvage)
    return a.kind_run(a, rec)
