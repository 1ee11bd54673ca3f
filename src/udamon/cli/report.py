"""``udamon report KIND``: read a record and answer a question about it."""

from __future__ import annotations

import argparse
import json
import sys

from udamon.errors import UsageError
from udamon.record.reader import read_record
from udamon.report import access

KINDS = {
    "access": "regions table: nr_accesses, age and per-probe hits of each region",
}


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="report on a record file",
                       description="Report on a record written by 'udamon record'.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="kinds:\n" + "\n".join(f"  {k:<8} {v}" for k, v in KINDS.items()))
    p.add_argument("kind", choices=list(KINDS), help="what to report")
    p.add_argument("-i", "--input", metavar="FILE", required=True, help="record file")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--snapshot", default="last", metavar="last|all|busiest|N",
                   help="which aggregation snapshot(s): last (default), all, busiest (the one "
                        "with the most reports: useful for bursty primitives such as hint), "
                        "or an index (negative counts from the end)")
    p.add_argument("--sort", default="address", metavar="KEY",
                   help="order of regions: address (default), size, nr_accesses, age, "
                        "or probe:NAME (hottest first)")
    p.add_argument("--pid", type=int, help="only this target")
    p.add_argument("--top", type=int, metavar="N", help="only the first N regions (after sorting)")
    p.add_argument("--salvage", action="store_true",
                   help="read a damaged record up to the damage instead of failing")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.snapshot not in ("last", "all", "busiest"):
        try:
            int(a.snapshot)
        except ValueError:
            raise UsageError(f"--snapshot must be last, all, busiest or an integer, "
                             f"got {a.snapshot!r}") from None
    if a.top is not None and a.top <= 0:
        raise UsageError("--top must be positive")
    rec = read_record(a.input, salvage=a.salvage)
    if a.sort not in access.SORT_KEYS:
        name = a.sort.removeprefix("probe:")
        if not a.sort.startswith("probe:") or name not in rec.probe_names:
            raise UsageError(f"--sort {a.sort!r}: use one of {', '.join(access.SORT_KEYS)} "
                             f"or probe:NAME with a probe of the record "
                             f"({', '.join(rec.probe_names) or 'it has none'})")
    if a.pid is not None and a.pid not in rec.pids:
        raise UsageError(f"--pid {a.pid} is not a target of {a.input} "
                         f"(targets: {', '.join(map(str, rec.pids))})")
    if not rec.complete:
        print(f"udamon: warning: {a.input} is incomplete (no end line); "
              "udamon was stopped before it finished", file=sys.stderr)
    opts = access.AccessOptions(a.snapshot, a.sort, a.pid, a.top)
    try:
        if a.format == "json":
            json.dump(access.to_json(rec, opts), sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(access.to_text(rec, opts))
    except IndexError as e:
        raise UsageError(str(e)) from None
    return 0
