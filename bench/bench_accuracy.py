"""Accuracy against ground truth on the pinned workload: udamon's primitives and kernel DAMON.

    sudo .venv/bin/python bench/bench_accuracy.py [--repeat 3] [--duration 8] [--primitives P,..]

Workload: tests/workloads/access_pattern, 4 buffers of 16 MiB: the reader
(CPU 0) reads R and S, the writer (CPU 1) writes W and S, I is populated once
and never touched again.  Truth: R, W, S hot; I cold; working set 3 x 16 MiB.

udamon: 'udamon record --primitive P --pid PID' (P: hint by default, rwp where
the kernel has it, each in its own column) with, per buffer B, probes
B (addr:B), B_c0/B_c1 (cpus), B_tr/B_tw (reader/writer thread), B_w (write):
probe counts are exact per buffer whatever the region boundaries.
- hot/cold (DAMON's way, by region nr_accesses): a buffer's score is its
  page-weighted nr_accesses, averaged over the snapshots that have any access
  ("busy" snapshots; hint goes quiet for seconds, and a quiet snapshot is "not
  observed", not "cold"); hot when the score is at least 10% of the highest
  buffer's score.  Also by the exact per-buffer probe hits, same 10% rule.
- CPU / thread precision: share of a buffer's probe hits from the right CPU /
  thread (R: reader, W: writer; S: its write hits from the writer).
- write precision: write hits on W and S / write hits on all four buffers;
  write recall: write hits on W / all hits on W (W is only ever written).
- WSS error: per busy snapshot, (bytes of all the target's regions with
  nr_accesses > 0 - 48 MiB) / 48 MiB; median over busy snapshots, then
  median (min..max) over runs.
- udamon's own CPU: user + system time of the 'udamon record' process over
  the run, in % of one CPU (start-up included).

Kernel DAMON (when a kdamond can be started here): paddr over the physical
ranges of the four buffers (from /proc/PID/pagemap), snapshots every
aggregation interval; each page takes the nr_accesses of the kernel region that
holds it; same hot/cold rule.  And vaddr on the workload process (the kernel
picks the initial regions from its mappings, as udamon does): a buffer's score
is the page-weighted nr_accesses of the regions over it; same rule.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import UDAMON, build, read_record, start_json_workload, summary

BUFS = "RWSI"
HOT = {"R", "W", "S"}
SIZE_MIB = 16


def _overlap(a0, a1, b0, b1) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def classify(scores: dict[str, float]) -> dict[str, str]:
    top = max(scores.values()) if scores else 0
    return {b: ("hot" if top > 0 and s >= 0.1 * top else "cold") for b, s in scores.items()}


def udamon_run(duration: float, primitive: str = "hint") -> dict:
    wl, info = start_json_workload([build("access_pattern"), "--size", str(SIZE_MIB),
                                    "--duration", str(duration + 300)])
    rng = {b: tuple(info[b]) for b in BUFS}
    probes = []
    for b in BUFS:
        a = f"addr:{rng[b][0]:#x}-{rng[b][1]:#x}"
        probes += [f"{b}={a}", f"{b}_c0={a},cpus:{info['reader_cpu']}",
                   f"{b}_c1={a},cpus:{info['writer_cpu']}",
                   f"{b}_tr={a},threads:{info['reader_tid']}",
                   f"{b}_tw={a},threads:{info['writer_tid']}", f"{b}_w={a},write"]
    fd, rec = tempfile.mkstemp(prefix="udamon-bench-", suffix=".jsonl")
    os.close(fd)
    try:
        argv = [*UDAMON, "record", "--primitive", primitive, "-q", "--pid", str(wl.pid),
                "--duration", f"{duration}s", "-o", rec]
        for p in probes:
            argv += ["--probe", p]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=duration * 4 + 240)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workload is not reaped yet
        cpu_pct = 100 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall
        if r.returncode != 0:
            raise RuntimeError(f"udamon record failed: {r.stderr.strip()[-300:]}")
        _, snaps, end = read_record(rec)
    finally:
        wl.terminate()
        wl.wait(30)
        os.unlink(rec)
    hits = {}
    busy = 0
    score = dict.fromkeys(BUFS, 0.0)
    wss_err = []
    truth = 3 * SIZE_MIB << 20
    for s in snaps:
        regs = s["regions"]
        for reg in regs:
            for k, v in reg["probes"].items():
                hits[k] = hits.get(k, 0) + v
        if not any(reg["nr_accesses"] for reg in regs):
            continue
        busy += 1
        wss = sum(reg["end"] - reg["start"] for reg in regs if reg["nr_accesses"] > 0)
        for b in BUFS:
            lo, hi = rng[b]
            acc = sum(_overlap(reg["start"], reg["end"], lo, hi) * reg["nr_accesses"]
                      for reg in regs)
            score[b] += acc / (hi - lo)
        wss_err.append((wss - truth) / truth * 100)
    score = {b: v / busy if busy else 0.0 for b, v in score.items()}

    def share(num, den):
        return hits.get(num, 0) / hits[den] if hits.get(den) else None

    wr_all = sum(hits.get(f"{b}_w", 0) for b in BUFS)
    return {"primitive": primitive, "cpu_pct": cpu_pct,
            "snapshots": len(snaps), "busy_snapshots": busy, "reports": end.get("reports"),
            "scores": score, "classes": classify(score), "hits": hits,
            "probe_classes": classify({b: float(hits.get(b, 0)) for b in BUFS}),
            "cpu_precision": {"R": share("R_c0", "R"), "W": share("W_c1", "W")},
            "thread_precision": {"R": share("R_tr", "R"), "W": share("W_tw", "W")},
            "write_precision": ((hits.get("W_w", 0) + hits.get("S_w", 0)) / wr_all
                                if wr_all else None),
            "write_recall": share("W_w", "W"),
            "s_write_share": share("S_w", "S"),
            "wss_err_pct": summary(wss_err)}


def kernel_run(duration: float, ops: str = "paddr") -> dict:
    from udamon.system.kernel_damon import (
        KernelAttrs,
        KernelDamon,
        classify_pages,
        kernel_damon_available,
        pfn_ranges,
        virt_to_pfns,
    )

    ok, why = kernel_damon_available(ops=ops)
    if not ok:
        return {"skipped": why}
    wl, info = start_json_workload([build("access_pattern"), "--size", str(SIZE_MIB),
                                    "--duration", str(duration + 300)])
    attrs = KernelAttrs()
    rng = {b: tuple(info[b]) for b in BUFS}
    try:
        k = KernelDamon(attrs, ops=ops)
        if ops == "paddr":
            pfns = {b: virt_to_pfns(wl.pid, *info[b]) for b in BUFS}

            def scores(regs):
                return {b: classify_pages(pfns[b], regs)[0].clip(0).mean() for b in BUFS}
        else:
            def scores(regs):
                return {b: sum(_overlap(s, e, *rng[b]) * n for s, e, n, _ in regs)
                        / (rng[b][1] - rng[b][0]) for b in BUFS}
        try:
            if ops == "paddr":
                k.start(pfn_ranges(np.concatenate(list(pfns.values())), 32))
            else:
                k.start([], pid=wl.pid)
            t_end = time.monotonic() + duration
            score = dict.fromkeys(BUFS, 0.0)
            n = 0
            while time.monotonic() < t_end:
                time.sleep(attrs.aggr_us / 1e6)
                regs = k.snapshot()
                n += 1
                for b, v in scores(regs).items():
                    score[b] += v
        finally:
            k.stop()
    finally:
        wl.terminate()
        wl.wait(30)
    score = {b: v / n if n else 0.0 for b, v in score.items()}
    return {"ops": ops, "snapshots": n, "scores": score, "classes": classify(score)}


def _kernel_summary(kd: list[dict]) -> dict:
    if kd and "skipped" in kd[0]:
        return {"skipped": kd[0]["skipped"]}
    return {"correct_of_4": summary([sum((r["classes"][b] == "hot") == (b in HOT)
                                         for b in BUFS) for r in kd]),
            "scores": {b: summary([r["scores"][b] for r in kd]) for b in BUFS}}


def run(repeat: int = 3, duration: float = 8.0, log=print, kernel_only: bool = False,
        kernel_ops: tuple[str, ...] = ("paddr", "vaddr"),
        primitives: tuple[str, ...] = ("hint",)) -> dict:
    uds: dict[str, list[dict]] = {p: [] for p in primitives}
    kds: dict[str, list[dict]] = {o: [] for o in kernel_ops}
    for i in range(repeat):
        for prim, ud in uds.items():
            if kernel_only:
                break
            ud.append(udamon_run(duration, prim))
            log(f"  accuracy rep {i}: udamon {prim} {ud[-1]['classes']} busy "
                f"{ud[-1]['busy_snapshots']}/{ud[-1]['snapshots']}, "
                f"CPU {ud[-1]['cpu_pct']:.1f}%")
        for ops, kd in kds.items():
            if kd and "skipped" in kd[0]:
                continue
            k = kernel_run(duration, ops)
            kd.append(k)
            if "skipped" in k:
                log(f"  kernel DAMON {ops}: skipped: {k['skipped']}")
            else:
                log(f"  accuracy rep {i}: kernel {ops} {k['classes']} scores "
                    + " ".join(f"{b}={v:.2f}" for b, v in k["scores"].items()))
    kd = kds.get("paddr", [])
    kernel = _kernel_summary(kd) if "paddr" in kds else {"skipped": "not asked for"}
    extra = {}
    if "vaddr" in kds:
        extra = {"runs_kernel_vaddr": kds["vaddr"], "kernel_vaddr": _kernel_summary(kds["vaddr"])}
    if kernel_only:
        return {"repeat": repeat, "duration_s": duration, "runs_kernel": kd, "kernel": kernel,
                **extra}
    return {"repeat": repeat, "duration_s": duration, "primitives": list(primitives),
            "runs_udamon": [r for ud in uds.values() for r in ud], "runs_kernel": kd,
            "udamon": {p: _udamon_summary(ud) for p, ud in uds.items()},
            "kernel": kernel, **extra}


def _udamon_summary(ud: list[dict]) -> dict:
    def med(key, sub=None):
        xs = [(r[key] if sub is None else r[key][sub]) for r in ud]
        xs = [x for x in xs if x is not None]
        return summary(xs)

    def correct(rs, key="classes"):
        return summary([sum((r[key][b] == "hot") == (b in HOT) for b in BUFS)
                        for r in rs if key in r])

    return {"correct_of_4": correct(ud), "probe_correct_of_4": correct(ud, "probe_classes"),
            "scores": {b: med("scores", b) for b in BUFS},
            "cpu_precision": {b: med("cpu_precision", b) for b in "RW"},
            "thread_precision": {b: med("thread_precision", b) for b in "RW"},
            "write_precision": med("write_precision"),
            "write_recall": med("write_recall"),
            "s_write_share": med("s_write_share"),
            "wss_err_pct_median": summary([r["wss_err_pct"]["median"] for r in ud
                                           if r["wss_err_pct"].get("n")]),
            "busy_snapshots": med("busy_snapshots"),
            "snapshots": med("snapshots"),
            "cpu_pct": med("cpu_pct")}


def _pct(s: dict) -> str:
    if not s.get("n"):
        return "–"
    return f"{s['median'] * 100:.1f}% ({s['min'] * 100:.1f}..{s['max'] * 100:.1f})"


def markdown(res: dict) -> list[str]:
    us = res["udamon"]
    if "correct_of_4" in us:  # a result of the one-primitive version
        us = {"hint": us}
    ks = [("paddr", res["kernel"])] + ([("vaddr", res["kernel_vaddr"])]
                                       if "kernel_vaddr" in res else [])
    out = [f"{res['repeat']} runs of {res['duration_s']:g} s each; median (min..max over runs).",
           "", "| measure | " + " | ".join(f"udamon {p}" for p in us) + " | "
           + " | ".join(f"kernel DAMON {o}" for o, _ in ks) + " |",
           "|---|" + "---|" * (len(us) + len(ks))]

    def kcol(fn, na: str = "n/a") -> str:
        return " | ".join(("not run: " + k["skipped"]) if "skipped" in k else
                          (fn(k) if fn else na) for _, k in ks)

    def ucol(fn) -> str:
        return " | ".join(fn(u) for u in us.values())

    def count(c):
        return f"{c['median']:.0f}/4 (min {c['min']:.0f})" if c.get("n") else "–"

    out.append("| buffers classified right (R, W, S hot; I cold) | "
               + ucol(lambda u: count(u["correct_of_4"])) + " | "
               + kcol(lambda k: count(k["correct_of_4"])) + " |")
    out.append("| same, by each buffer's exact probe hits (addr probe) | "
               + ucol(lambda u: count(u["probe_correct_of_4"])) + " | " + kcol(None, "–")
               + " |")
    for b in BUFS:
        out.append(f"| score of {b} (mean nr_accesses per page, busy snapshots) | "
                   + ucol(lambda u, b=b: f"{u['scores'][b]['median']:.2f} "
                          f"({u['scores'][b]['min']:.2f}..{u['scores'][b]['max']:.2f})")
                   + " | " + kcol(lambda k, b=b: f"{k['scores'][b]['median']:.2f}") + " |")
    na = kcol(None)
    rows = [("CPU precision, R (reader CPU)", lambda u: _pct(u["cpu_precision"]["R"])),
            ("CPU precision, W (writer CPU)", lambda u: _pct(u["cpu_precision"]["W"])),
            ("thread precision, R (reader tid)", lambda u: _pct(u["thread_precision"]["R"])),
            ("thread precision, W (writer tid)", lambda u: _pct(u["thread_precision"]["W"])),
            ("write precision (write hits on W+S / on all)",
             lambda u: _pct(u["write_precision"])),
            ("write recall (write hits on W / hits on W)", lambda u: _pct(u["write_recall"])),
            ("write recall on S (read and written every pass: write hits / hits)",
             lambda u: _pct(u["s_write_share"]))]
    out += [f"| {name} | {ucol(fn)} | {na} |" for name, fn in rows]

    def wss(u):
        w = u["wss_err_pct_median"]
        return f"{w['median']:+.0f}% ({w['min']:+.0f}..{w['max']:+.0f})" if w.get("n") else "–"

    def cpu(u):
        c = u.get("cpu_pct") or {}
        return f"{c['median']:.1f}% ({c['min']:.1f}..{c['max']:.1f})" if c.get("n") else "–"

    dash = kcol(None, "–")
    out += [f"| WSS error, median over busy snapshots | {ucol(wss)} | {dash} |",
            "| busy snapshots / snapshots | "
            + ucol(lambda u: f"{u['busy_snapshots']['median']:.0f} / "
                   f"{u['snapshots']['median']:.0f}") + f" | {dash} |",
            f"| udamon's own CPU (% of one CPU, start-up included) | {ucol(cpu)} | {dash} |"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--kernel-only", action="store_true",
                    help="only the kernel DAMON part (e.g. inside a slow emulated guest)")
    ap.add_argument("--kernel-ops", default="paddr,vaddr",
                    help="kernel DAMON operations to compare with (default paddr,vaddr)")
    ap.add_argument("--primitives", default="hint",
                    help="udamon primitives to run, one column each (default hint; e.g. "
                         "hint,rwp where the kernel has RWP)")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    ops = tuple(o for o in a.kernel_ops.split(",") if o)
    if not set(ops) <= {"paddr", "vaddr"}:
        ap.error("--kernel-ops: paddr and/or vaddr")
    prims = tuple(p for p in a.primitives.split(",") if p)
    if not prims or not set(prims) <= {"hint", "wp", "rwp"}:
        ap.error("--primitives: a comma-separated list of hint, wp, rwp")
    res = run(a.repeat, a.duration, log=lambda s: print(s, file=sys.stderr, flush=True),
              kernel_only=a.kernel_only, kernel_ops=ops, primitives=prims)
    if not a.kernel_only:
        print("\n".join(markdown(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
