"""``udamon demo``: a monitoring session a newcomer can run in seconds.

Live (root): start a small pinned workload, record it with the best live primitive
for the story (rwp where the kernel has it: controlled sampling of reads and
writes; else hint and wp side by side: wp samples the writes the DAMON way, hint
adds the reads; else hint alone) and a CPU and read/write breakdown, and show who
touched which buffer -- then say, from the table's own numbers, what it shows and
what it cannot (hint sees only the first access after the kernel's scanner hinted
a page, so a buffer that both threads use may show only one of them).  Otherwise: the same
story on synthetic reports through the replay primitive.  Every step is printed as
the command it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile

import numpy as np

from udamon.record.reader import read_record

DEMO_PROBES = ["cpu0=cpus:0", "cpu1=cpus:1"]
BUFFERS = {"R": "read by the reader", "W": "written by the writer",
           "S": "read by the reader and written by the writer",
           "I": "touched once at start, then idle"}
# what each buffer should show: (reads by the reader's CPU, writes by the writer's CPU)
EXPECT = {"R": (True, False), "W": (False, True), "S": (True, True), "I": (False, False)}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run a short demo monitoring session and show its report",
        description="Record a small two-thread workload with known ground truth and show "
                    "which CPU read or wrote which buffer, and what the primitive could and "
                    "could not see.  Live when this machine allows it (root): with rwp "
                    "where the kernel has it (Linux 7.3+), else hint and wp together "
                    "(wp: Linux 6.7+), else hint; otherwise on synthetic reports.")
    p.add_argument("--dir", metavar="DIR", help="where to keep the files (default: a temp dir)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--live", action="store_true", help="insist on the live demo")
    mode.add_argument("--replay", action="store_true", help="use synthetic reports only")
    p.set_defaults(func=run)


def live_primitive() -> tuple[str | None, str]:
    """rwp (reads and writes, controlled sampling) where it runs, else hint,wp (wp
    samples the writes, hint sees reads too), else hint; None and why when none does."""
    from udamon.primitives.registry import entry

    why, ok = [], {}
    for name in ("rwp", "hint", "wp"):
        ok[name], reason = entry(name).available()
        if not ok[name]:
            why.append(f"{name}: {reason}")
    if ok["rwp"]:
        return "rwp", ""
    if ok["hint"]:
        return ("hint,wp" if ok["wp"] else "hint"), ""
    return None, "; ".join(why)


def run(a: argparse.Namespace) -> int:
    d = a.dir or tempfile.mkdtemp(prefix="udamon-demo-")
    os.makedirs(d, exist_ok=True)
    prim, why = live_primitive() if not a.replay else (None, "")
    if a.live and prim is None:
        from udamon.errors import RuntimeFailure

        raise RuntimeFailure(f"the live demo needs the rwp or hint primitive ({why})")
    if prim is not None:
        return _live(d, prim)
    if not a.replay:
        print(f"(live demo not possible here: {why}; using synthetic reports)\n")
    return _replay(d)


def _udamon(step: list[str]) -> int:
    from udamon.cli.main import main as udamon_main

    print("$ udamon " + " ".join(step), flush=True)
    return udamon_main(step)


HOW = {
    "rwp": "rwp: every 5 ms one random page of each region is read-write protected and "
           "its first access reported (userfaultfd RWP, Linux 7.3+); nothing system-wide "
           "changes",
    "hint": "hint: NUMA-balancing hinting faults (kernel.numa_balancing is on for the "
            "session, then restored); the kernel's scanner decides which pages fault, and "
            "only the first access after it hinted a page is seen",
    "hint,wp": "hint and wp side by side: wp write-protects one random page of each region "
               "every 5 ms and reports its first write (userfaultfd, Linux 6.7+; it drives "
               "nr_accesses), hint adds the reads it sees from NUMA-balancing hinting faults "
               "(kernel.numa_balancing is on for the session, then restored; the kernel's "
               "scanner decides which pages fault)",
}


def _live(d: str, prim: str) -> int:
    rec_path = os.path.join(d, "rec.jsonl")
    cmd = [sys.executable, "-m", "udamon.workloads.pinned", "--duration", "30", "--size", "16"]
    print("Starting the workload: a reader thread reads R and S, a writer thread writes W "
          "and S,\nI is touched once and left alone.\n$ " + shlex.join(cmd), flush=True)
    wl = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(wl.stdout.readline())
        lo = min(v[0] for k, v in info.items() if k in BUFFERS) & ~0xFFF
        hi = (max(v[1] for k, v in info.items() if k in BUFFERS) + 0xFFF) & ~0xFFF
        print(f"  (reader on CPU {info['reader_cpu']}, writer on CPU {info['writer_cpu']})")
        for k in "RWSI":
            print(f"  {k} {info[k][0]:#x}-{info[k][1]:#x}  {BUFFERS[k]}")
        print(f"\nRecording 5 s with {HOW[prim]}:")
        rc = _udamon(["record", "--primitive", prim, "--pid", str(info["pid"]),
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
    _who_touched(rec_path, {k: info[k] for k in "RWSI"}, prim, info)
    print(f"\nFiles are in {d}.  Try 'udamon report access -i {rec_path} --snapshot all'.")
    return 0


def buffer_hits(rec, buffers: dict[str, list[int]], names: list[str]) -> dict[str, dict]:
    """Per buffer, the probe hits of the regions inside its whole pages, summed over
    snapshots.  The buffers are not page-aligned: the page where one ends and the next
    begins holds both, and a write to the writer's last bytes must not count as a
    write on its neighbour (wp samples such a page as often as any other)."""
    out = {}
    for k, (lo, hi) in buffers.items():
        tot = dict.fromkeys(names, 0)
        first, last = np.uint64((lo + 0xFFF) & ~0xFFF), np.uint64(hi & ~0xFFF)
        for s in rec.snapshots:
            inside = (s.start >= first) & (s.end <= last)
            for n in names:
                tot[n] += int(s.probe_hits[n][inside].sum())
        out[k] = tot
    return out


def verdict(k: str, h: dict[str, int], prim: str, rcpu: str, wcpu: str) -> str:
    """What the table shows for buffer ``k``, and why it differs from what the workload
    does when it does: told from the numbers, never assumed."""
    want_r, want_w = EXPECT[k]
    seen_r = h["read"] > 0 and (h.get(rcpu, 0) > 0)
    seen_w = h["write"] > 0 and (h.get(wcpu, 0) > 0)
    if not want_r and not want_w:
        if h["read"] + h["write"] == 0:
            if prim == "rwp":
                return "no access seen: sampled and not accessed, as the workload does"
            return ("no access seen: " + ("wp sampled it and saw no write; " if "wp" in prim
                                          else "") + "with hint no read means 'not observed' "
                    "(the scanner decides what faults); here it is idle indeed")
        return "accessed after all (its first touch, or a page the primitive got wrong)"
    parts = []
    if want_r:
        parts.append(f"reads by {rcpu}: {h.get(rcpu, 0) if seen_r else 0} hits")
    if want_w:
        parts.append(f"writes by {wcpu}: {h.get(wcpu, 0) if seen_w else 0} hits")
    missing = [w for w, want, seen in (("read", want_r, seen_r), ("write", want_w, seen_w))
               if want and not seen]
    if not missing:
        return "; ".join(parts) + " -- as the workload does"
    hint = "hint" in prim.split(",")
    if prim == "hint,wp" and missing == ["write"]:
        why = ("no write seen in these 5 s: wp samples one page per region per 5 ms, and the "
               "sampled pages were not written while protected")
    elif hint and missing == ["read"] and k == "S":
        why = ("no read seen: hint reports only the first access to a page after the "
               "kernel's scanner hinted it, and on S the writer got there first every time "
               "(wp sees only writes; rwp, Linux 7.3+, samples both)")
    elif prim == "hint" and len(missing) == 1 and k == "S":
        other = "writer" if missing[0] == "read" else "reader"
        why = (f"no {missing[0]} seen: hint reports only the first access to a page after "
               f"the kernel's scanner hinted it, and on S the {other} got there first every "
               "time (rwp, Linux 7.3+, sees both)")
    elif hint:
        why = ("not observed: the kernel's scanner did not get to it in these 5 s (a gap is "
               "'not observed', not 'not accessed')")
    else:
        why = (f"no {' or '.join(missing)} seen in these 5 s: rwp samples one page per "
               "region per 5 ms, and the other thread's access came first")
    return "; ".join(parts) + " -- " + why


def _who_touched(rec_path: str, buffers: dict[str, list[int]], prim: str = "hint",
                 info: dict | None = None) -> None:
    rec = read_record(rec_path)
    cpus = [n for n in rec.probe_names if n.startswith("cpu:")]
    names = cpus + ["read", "write"]
    hits = buffer_hits(rec, buffers, names)
    print("  buffer  " + "  ".join(f"{n:>7}" for n in names))
    for k in buffers:
        print(f"  {k:<6}  " + "  ".join(f"{hits[k][n]:>7}" for n in names)
              + f"   ({BUFFERS[k]})")
    total = sum(hits[k]["read"] + hits[k]["write"] for k in buffers)
    reports = (rec.end or {}).get("reports", 0)
    print(f"  These are hits, not reports: a report is one access seen (the recording has "
          f"{reports:,});\n  a hit is one sampling interval (5 ms) of one region with at "
          "least one report in it,\n  as DAMON counts nr_accesses, however many reports "
          f"landed there ({total:,} read and write\n  hits above).")
    rcpu = f"cpu:{(info or {}).get('reader_cpu', 0)}"
    wcpu = f"cpu:{(info or {}).get('writer_cpu', 1)}"
    print("\nWhat the table shows:")
    for k in buffers:
        print(f"  {k}: {verdict(k, hits[k], prim, rcpu, wcpu)}")


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
