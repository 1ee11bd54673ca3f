"""``udamon import``: write a udamon record of another tool's record file.

``--format damo``: the record files damo 3.4 (DAMON's user-space tool) writes,
json_compressed, json, perf_script and perf_data (see ``record/damo_import.py``
for the mapping).  ``udamon report KIND -i FILE`` reads those files directly too;
importing keeps a udamon record of them (to annotate, merge or export again).
"""

from __future__ import annotations

import argparse
import os
import sys

from udamon.errors import InputError, UsageError
from udamon.record import damo_import
from udamon.record.writer import RecordWriter

FORMATS = ("damo",)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import", help="convert another tool's record (damo) into a udamon record",
        description="Write a udamon record of a damo record file (DAMON's user-space tool, "
                    f"{damo_import.DAMO_VERSION}): json_compressed, json, perf_script or "
                    "perf_data (perf.data needs perf), recognised by content.  Kept: regions, "
                    "nr_accesses, age, probe hits (as probe0, probe1, ...), intervals, "
                    "snapshot times; targets take their pid from FILE.kdamonds when damo "
                    "wrote one.  'udamon report KIND -i FILE' reads damo files directly too.")
    p.add_argument("--format", default="damo", choices=FORMATS,
                   help="the input's tool (default damo)")
    p.add_argument("-i", "--input", metavar="FILE", required=True, help="damo record file")
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="udamon record to write (gzip when it ends in .gz)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if not os.path.exists(a.input):
        raise InputError(f"{a.input}: no such file")
    if os.path.isdir(a.input):
        raise InputError(f"{a.input}: is a directory, not a record file")
    if os.path.isdir(a.output):
        raise UsageError(f"-o {a.output}: is a directory")
    if os.path.exists(a.output) and os.path.samefile(a.output, a.input):
        raise UsageError(f"-o {a.output}: is the input; choose another file")
    kind = damo_import.sniff(a.input)
    if kind is None:
        raise InputError(f"{a.input}: not a damo record file (json_compressed, json, "
                         "perf_script or perf_data)")
    rec = damo_import.read_damo(a.input, kind)
    w = RecordWriter(a.output)
    w.write_header(rec.header)
    for s in rec.snapshots:
        w.write_snapshot(s)
    w.close("input-exhausted")
    print(f"udamon: wrote {w.snapshots} snapshots of {len(rec.pids)} target(s) from damo's "
          f"{kind} record to {a.output}", file=sys.stderr)
    return 0
