"""``udamon report KIND``: read a record and answer a question about it.

One runner for every kind (udamon.report.kind.KINDS): each kind's subparser has the
common options (-i, --format with the formats that kind writes, --pid, --top,
--salvage) plus its own (cli/report_kinds.py), which become the kind's options; the
kind computes its answer and writes it as text, JSON or an image.
"""

from __future__ import annotations

import argparse
import json
import sys

from udamon.cli.common import open_record
from udamon.cli.report_kinds import OPTION_NAMES, OPTIONS
from udamon.errors import ParameterError, UsageError
from udamon.report.kind import KINDS


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="report on a record file",
                       description="Report on a record written by 'udamon record'.  "
                                   "'udamon report KIND --help' tells each kind's options.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="kinds:\n" + "\n".join(f"  {k:<8} {v.help}"
                                                     for k, v in KINDS.items()))
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=type(p))
    kinds.required = True
    for name, kind in KINDS.items():
        k = kinds.add_parser(name, help=kind.help, description=kind.help)
        k.add_argument("-i", "--input", metavar="FILE", required=True,
                       help="record file (udamon's, or a record file of damo 3.4: "
                            "json_compressed, json, perf_script, perf_data)")
        k.add_argument("--format", choices=kind.formats, default="text",
                       help="output format (default text)")
        k.add_argument("--pid", type=int, help="only this target")
        k.add_argument("--top", type=int, metavar="N", help="at most N rows")
        k.add_argument("--salvage", action="store_true",
                       help="read a damaged record up to the damage instead of failing")
        OPTIONS[name][0](k)
        k.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    if a.top is not None and a.top <= 0:
        raise UsageError("--top must be positive")
    kind = KINDS[a.kind]
    rec = open_record(a.input, a.pid, a.salvage)
    opts = OPTIONS[a.kind][1](a, rec)
    output = getattr(a, "output", None)
    try:
        out = kind.run(rec, a.format, opts, output)
    except ParameterError as e:
        raise UsageError(e.for_option(OPTION_NAMES.get(e.param))) from None
    except IndexError as e:  # access: no such snapshot
        raise UsageError(str(e)) from None
    except OSError as e:  # the image file
        raise UsageError(f"cannot write {output}: {e.strerror or e}") from None
    if a.format == "json":
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif a.format == "png":
        print(f"udamon: wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0
