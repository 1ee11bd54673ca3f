"""``udamon export``: convert a record into another tool's record format.

``--format damo``: a record file of damo 3.4.3, DAMON's user-space tool, that
``damo report access|heatmap|wss -i FILE`` read (see ``record/damo_export.py``
for the mapping and what is dropped).
"""

from __future__ import annotations

import argparse
import os
import sys

from udamon.cli.common import open_record
from udamon.errors import InputError, UsageError
from udamon.record import damo_export

FORMATS = ("damo",)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="convert a record into another tool's format (damo)",
        description="Convert a record written by 'udamon record' into another tool's record "
                    f"format.  --format damo writes a damo {damo_export.DAMO_VERSION} record "
                    "(DAMON's user-space tool): 'damo report access|heatmap|wss -i OUT' read "
                    "it (damo needs the 'file' command).  Kept: regions, nr_accesses, age, "
                    "probe hit counts (by position, without names), intervals, snapshot "
                    "times; dropped: filter and probe definitions, page NUMA nodes, "
                    "report counts, primitive and coverage.")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("-i", "--input", metavar="FILE", required=True, help="record file")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="file to write")
    p.add_argument("--pid", type=int, help="only this target (default: every target)")
    p.add_argument("--damo-type", choices=damo_export.FILE_TYPES,
                   default=damo_export.DEFAULT_FILE_TYPE,
                   help="damo record file type (default json_compressed; damo 3.4.3 reads "
                        "plain json only where 'file' calls it 'JSON data': file 5.44 "
                        "says 'JSON text data' and damo then fails)")
    p.add_argument("--salvage", action="store_true",
                   help="read a damaged record up to the damage instead of failing")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if os.path.isdir(a.output):
        raise UsageError(f"-o {a.output}: is a directory")
    if os.path.exists(a.output) and os.path.samefile(a.output, a.input):
        raise UsageError(f"-o {a.output}: is the input record; choose another file")
    rec = open_record(a.input, a.pid, a.salvage)
    records = damo_export.to_damo_records(rec, a.pid)
    if not records:
        which = f"target {a.pid}" if a.pid is not None else "any target"
        raise InputError(f"{a.input}: no snapshot with regions for {which}; nothing to export")
    data = damo_export.to_damo_bytes(rec, a.pid, a.damo_type)
    try:
        with open(a.output, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UsageError(f"cannot write {a.output}: {e.strerror}") from None
    nsnap = sum(len(r["snapshots"]) for r in records)
    print(f"udamon: wrote a damo {damo_export.DAMO_VERSION} {a.damo_type} record of "
          f"{len(records)} target(s), {nsnap} snapshots to {a.output}", file=sys.stderr)
    return 0
