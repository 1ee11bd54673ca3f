"""``udamon demo``: a monitoring session a newcomer can run in seconds."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

DEMO_PROBES = ["cpu0=cpus:0", "cpu1=cpus:1"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run a short demo monitoring session and show its report",
        description="Generate a synthetic two-thread workload with known ground truth, "
                    "record it with a write-only sample filter and per-CPU probes, and "
                    "print the report.  Prints each command it runs, so you can rerun and "
                    "vary them.")
    p.add_argument("--dir", metavar="DIR", help="where to keep the files (default: a temp dir)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from udamon.cli.main import main as udamon_main

    d = a.dir or tempfile.mkdtemp(prefix="udamon-demo-")
    os.makedirs(d, exist_ok=True)
    csv_path = os.path.join(d, "accesses.csv")
    rec_path = os.path.join(d, "rec.jsonl")
    steps = [
        ["synth", "-o", csv_path],
        ["record", "--input", csv_path, "--write-only", "--probe", DEMO_PROBES[0],
         "--probe", DEMO_PROBES[1], "--seed", "1", "-q", "-o", rec_path],
        ["report", "access", "-i", rec_path, "--sort", "nr_accesses"],
    ]
    print("The workload: a reader on CPU 0 reads R (0x7f0000000000), a writer on CPU 1 "
          "writes W (+32 MiB),\nboth use S (+64 MiB); I (+96 MiB) goes idle after 200 ms. "
          "Recording writes only (--write-only),\nwith probes counting every access by "
          "CPU 0 and by CPU 1.\n")
    for step in steps:
        print("$ udamon " + " ".join(step), flush=True)
        rc = udamon_main(step)
        if rc:
            return rc
    print("Read it: W and S have high nr_acc (written), R has nr_acc 0 but high cpu0 hits "
          "(read by CPU 0, not written);\nI has aged (not accessed for a while). "
          f"Files are in {d}.")
    sys.stdout.flush()
    return 0
