"""``udamon synth``: write a deterministic synthetic replay input (CSV)."""

from __future__ import annotations

import argparse
import sys

from udamon.cli.common import duration_arg, typed
from udamon.primitives.synthetic import demo_workload, generate, write_csv


def add_parser(sub) -> None:
    p = sub.add_parser(
        "synth", help="write a synthetic replay input (CSV) with known ground truth",
        description="Write the demo workload's access reports as a replay CSV: pid 4242, a "
                    "reader thread (tid 4243, CPU 0) reading buffer R at 0x7f0000000000 "
                    "(16 MiB), a writer (tid 4244, CPU 1) writing buffer W at +32 MiB "
                    "(16 MiB), both on a shared buffer S at +64 MiB (8 MiB), and an idle "
                    "buffer I at +96 MiB (16 MiB) touched only in the first 200 ms.")
    p.add_argument("-o", "--output", metavar="CSV", required=True)
    p.add_argument("--duration", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=3_000_000_000, help="length of the trace (default 3s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--pid", type=int, default=4242, help="pid of the synthetic process")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    reports = generate(demo_workload(a.pid), a.duration, seed=a.seed)
    try:
        write_csv(reports, a.output)
    except OSError as e:
        from udamon.errors import UsageError

        raise UsageError(f"cannot write {a.output}: {e.strerror}") from None
    print(f"udamon: wrote {reports.size} reports to {a.output}", file=sys.stderr)
    return 0
