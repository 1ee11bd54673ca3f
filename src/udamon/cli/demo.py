"""``udamon demo``: a monitoring session a newcomer can run in seconds.

Live (root, hint primitive available): start a small pinned workload, record
it with the hint primitive and a CPU and read/write breakdown, and show who
touched which buffer.  Otherwise: the same story on synthetic reports through
the replay primitive.  Every step is printed as the command it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np

from udamon.record.reader import read_record

DEMO_PROBES = ["cpu0=cpus:0", "cpu1=cpus:1"]
BUFFERS = {"R": "read by the reader (CPU 0)", "W": "written by the writer (CPU 1)",
           "S": "read by the reader and written by the writer",
           "I": "touched once at start, then idle"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run a short demo monitoring session and show its report",
        description="Record a small two-thread workload with known ground truth and show "
                    "which CPU read or wrote which buffer.  Live with the hint primitive "
                    "when this machine allows it (root), else on synthetic reports.")
    p.add_argument("--dir", metavar="DIR", help="where to keep the files (default: a temp dir)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="insist on the live demo")
    mode.add_argument("--replay", action="store_true", help="use synthetic reports only")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from udamon.primitives.hint import hint_available

    d = a.dir or tempfile.mkdtemp(prefix="udamon-demo-")
    os.makedirs(d, exist_ok=True)
    ok, why = hint_available()
    if a.live and not ok:
        from udamon.errors import RuntimeFailure

        raise RuntimeFailure(f"the live demo needs the hint primitive: {why}")
    if ok and not a.replay:
        return _live(d)
    if not a.replay:
        print(f"(live demo not possible here: {why}; using synthetic reports)\n")
    return _replay(d)


def _udamon(step: list[str]) -> int:
    from udamon.cli.main import main as udamon_main

    print("$ udamon " + " ".join(step), flush=True)
    return udamon_main(step)


def _live(d: str) -> int:
    rec_path = os.path.join(d, "rec.jsonl")
    cmd = [sys.executable, "-m", "udamon.workloads.pinned", "--duration", "30", "--size", "16"]
    print("Starting the workload: a reader thread on CPU 0 reads R and S, a writer thread on "
          "CPU 1 writes W and S,\nI is touched once and left alone.\n$ "
          + " ".join(cmd[1:]), flush=True)
    wl = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(wl.stdout.readline())
        lo = min(v[0] for k, v in info.items() if k in BUFFERS) & ~0xFFF
        hi = (max(v[1] for k, v in info.items() if k in BUFFERS) + 0xFFF) & ~0xFFF
        for k in "RWSI":
            print(f"  {k} {info[k][0]:#x}-{info[k][1]:#x}  {BUFFERS[k]}")
        print("\nRecording 5 s with NUMA-balancing hinting faults (kernel.numa_balancing is "
              "on for the session, then restored):")
        rc = _udamon(["record", "--primitive", "hint", "--pid", str(info["pid"]),
                      "--range", f"{lo:#x}-{hi:#x}", "--regions", "32,400",
                      "--breakdown", "cpu,rw", "--duration", "5s", "-o", rec_path])
    finally:
        wl.send_signal(signal.SIGTERM)
        wl.wait()
    if rc:
        return rc
    print()
    rc = _udamon(["report", "access", "-i", rec_path, "--snapshot", "busiest", "--top", "12",
                  "--sort", "nr_accesses"])
    if rc:
        return rc
    print("\nWho touched each buffer over the whole recording (probe hits summed over "
          "snapshots):")
    _who_touched(rec_path, {k: info[k] for k in "RWSI"})
    print(f"\nFiles are in {d}.  Try 'udamon report access -i {rec_path} --snapshot all'.")
    return 0


def _who_touched(rec_path: str, buffers: dict[str, list[int]]) -> None:
    rec = read_record(rec_path)
    names = [n for n in rec.probe_names if n.startswith("cpu:")] + ["read", "write"]
    print("  buffer  " + "  ".join(f"{n:>7}" for n in names))
    for k, (lo, hi) in buffers.items():
        tot = dict.fromkeys(names, 0)
        for s in rec.snapshots:
            inside = (s.start >= np.uint64(lo & ~0xFFF)) & (s.end <= np.uint64(hi + 0xFFF))
            for n in names:
                tot[n] += int(s.probe_hits[n][inside].sum())
        print(f"  {k:<6}  " + "  ".join(f"{tot[n]:>7}" for n in names) + f"   ({BUFFERS[k]})")
    print("  (hint faults come in bursts when the kernel's NUMA scanner passes; a buffer "
          "with no hits was not observed)")


def _replay(d: str) -> int:
    csv_path = os.path.join(d, "accesses.csv")
    rec_path = os.path.join(d, "rec.jsonl")
    print("The workload (synthetic): a reader on CPU 0 reads R (0x7f0000000000), a writer on "
          "CPU 1 writes W (+32 MiB),\nboth use S (+64 MiB); I (+96 MiB) goes idle after "
          "200 ms.  Recording writes only (--write-only),\nwith probes counting every access "
          "by CPU 0 and by CPU 1.\n")
    steps = [
        ["synth", "-o", csv_path, "--duration", "2s"],
        ["record", "--input", csv_path, "--write-only", "--probe", DEMO_PROBES[0],
         "--probe", DEMO_PROBES[1], "--seed", "1", "-q", "-o", rec_path],
        ["report", "access", "-i", rec_path],
    ]
    for step in steps:
        rc = _udamon(step)
        if rc:
            return rc
    print("\nRead it: W and S have high nr_acc (written), R has nr_acc 0 but high cpu0 hits "
          "(read by CPU 0, not written);\nI has aged (not accessed for a while). "
          f"Files are in {d}.")
    sys.stdout.flush()
    return 0
