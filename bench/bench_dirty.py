"""Dirty rate: udamon against QEMU's calc-dirty-rate and the guests' truth; cost on the target.

    .venv/bin/python bench/bench_dirty.py [--runs 3] [--linux] [--cost] [--json FILE]

1. Three bare-metal TCG VMs (tests/workloads/dirty_vm.py) dirtying 200 / 2000 /
   20000 pages per second of a 128 MiB buffer; per run, on the same VMs:
   ``udamon dirty-rate`` at its defaults, ``udamon dirty-rate --exact`` (4 s),
   QEMU's ``calc-dirty-rate`` page-sampling at its default 512 sample pages per
   GiB and at its maximum 16384, 1 s each -- against the distinct pages the
   guest itself wrote per 1 s window.  udamon's CPU time per run is measured.
2. ``--linux``: one Linux guest (the guest tier's kernel with the dirtier as
   init) at 2000 pages/s: its own kernel's writes come on top of the
   dirtier's, which udamon and QEMU both see.
3. ``--cost``: what the estimate costs the target: a host process writing random
   pages of 256 MiB as fast as it can (all 65536 pages dirtied each second),
   writes per second unmonitored, under the default sampled estimate and under
   --exact, alternating, ``--runs`` pairs of 6 s each.

Run it alone (``flock /tmp/udamon-guest.lock``): the VMs keep both CPUs busy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from workloads.build import build  # noqa: E402
from workloads.dirty_vm import VM, start_vms  # noqa: E402

PAGE = 4096
RATES = (200, 2000, 20000)
MIB = 1 << 20


def udamon(*args: str, timeout: float = 180) -> tuple[dict, float]:
    """Run udamon dirty-rate (JSON); its output and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-m", "udamon", "dirty-rate", "--format", "json",
                        "-q", *args], capture_output=True, text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"udamon dirty-rate failed: {p.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(p.stdout), cpu


def truth(vm: VM, first: int) -> float:
    time.sleep(1.1)
    t = vm.truth(first)
    return (t["distinct_mean"] + t["own_mean"]) * PAGE


def mark(vms: list[VM]) -> dict[int, int]:
    for v in vms:
        v.poll_console()
    return {v.pid: len(v.lines) for v in vms}


def vm_runs(runs: int, log) -> dict:
    vms = start_vms(list(RATES))
    out: dict = {"runs": []}
    try:
        time.sleep(1)
        pids = ",".join(str(v.pid) for v in vms)
        for r in range(runs):
            row: dict = {"vms": {}}
            first = mark(vms)
            doc, cpu = udamon("--pid", pids)
            row["udamon_cpu_s"] = cpu
            row["udamon_order"] = [next(v.rate for v in vms if v.pid == t["pid"])
                                   for t in doc["targets"]]
            for t in doc["targets"]:
                v = next(x for x in vms if x.pid == t["pid"])
                tr = truth(v, first[v.pid])
                row["vms"][v.rate] = {"truth_bps": tr, "udamon_bps": t["mean_bps"],
                                      "low_bps": t["interval"]["low_bps"],
                                      "high_bps": t["interval"]["high_bps"],
                                      "converged_after_ns": t["converged_after_ns"],
                                      "windows": t["windows"]}
            first = mark(vms)
            doc, cpu = udamon("--pid", pids, "--exact", "--duration", "4s", "--precision", "0")
            row["exact_cpu_s"] = cpu
            for t in doc["targets"]:
                v = next(x for x in vms if x.pid == t["pid"])
                row["vms"][v.rate]["exact_bps"] = t["mean_bps"]
                row["vms"][v.rate]["exact_truth_bps"] = truth(v, first[v.pid])
            for sp in (512, 16384):
                for v in vms:
                    first = mark([v])
                    q = v.calc_dirty_rate(1, sp)
                    row["vms"][v.rate][f"qemu{sp}_mib_s"] = q["dirty-rate"]
                    row["vms"][v.rate][f"qemu{sp}_truth_bps"] = truth(v, first[v.pid])
            q = {v.rate: row["vms"][v.rate]["qemu512_mib_s"] for v in vms}
            row["qemu512_order"] = sorted(q, key=lambda k: (q[k], k))
            row["qemu512_ties"] = len(set(q.values())) < len(q)
            out["runs"].append(row)
            log(f"  run {r + 1}: " + "; ".join(
                f"{k}: truth {x['truth_bps'] / MIB:.2f} udamon {x['udamon_bps'] / MIB:.2f} "
                f"exact {x['exact_bps'] / MIB:.2f} qemu {x['qemu512_mib_s']}/{x['qemu16384_mib_s']}"
                for k, x in row["vms"].items()) + " MiB/s")
    finally:
        for v in vms:
            v.stop()
    return out


def linux_run(log) -> dict:
    vm = VM(2000, kind="linux").start()
    try:
        vm.wait_ready(timeout=180)
        time.sleep(2)
        first = mark([vm])
        sampled, _ = udamon("--pid", str(vm.pid))
        t_s = truth(vm, first[vm.pid])
        first = mark([vm])
        exact, _ = udamon("--pid", str(vm.pid), "--exact", "--duration", "4s", "--precision", "0")
        t_e = truth(vm, first[vm.pid])
        first = mark([vm])
        q = vm.calc_dirty_rate(1, 16384)["dirty-rate"]
        t_q = truth(vm, first[vm.pid])
        out = {"truth_bps": (t_s + t_e + t_q) / 3, "udamon_bps": sampled["targets"][0]["mean_bps"],
               "exact_bps": exact["targets"][0]["mean_bps"], "qemu16384_mib_s": q}
        log(f"  linux guest: dirtier's own {out['truth_bps'] / MIB:.2f} MiB/s, udamon "
            f"{out['udamon_bps'] / MIB:.2f}, exact {out['exact_bps'] / MIB:.2f}, QEMU {q}")
        return out
    finally:
        vm.stop()


def cost_runs(runs: int, log) -> dict:
    binary = build("dirtier")
    res: dict = {"none": [], "sample": [], "exact": [], "cpu": {"sample": [], "exact": []}}
    for _ in range(runs):
        for mode in ("none", "sample", "exact"):
            p = subprocess.Popen([binary, "--rate", "-1", "--mib", "256"],
                                 stdout=subprocess.PIPE, text=True)
            try:
                json.loads(p.stdout.readline())
                time.sleep(1.5)
                t_start = time.monotonic()
                cpu = None
                if mode == "none":
                    time.sleep(6)
                else:
                    extra = ["--exact"] if mode == "exact" else []
                    _, cpu = udamon("--pid", str(p.pid), "--precision", "0", "--duration", "6s",
                                    *extra)
                    res["cpu"][mode].append(cpu / 6)
                el = time.monotonic() - t_start
            finally:
                p.kill()
                lines = [json.loads(x) for x in p.stdout.read().splitlines() if x.strip()]
                p.wait()
            ws = [w for w in lines if "window" in w]
            # the windows that lie inside the measured span (skip the first 1.5 s and the tail)
            inside = ws[2:2 + int(el) - 1]
            res[mode].append(statistics.mean(w["writes"] for w in inside))
    base = statistics.median(res["none"])
    out = {k: statistics.median(v) for k, v in res.items() if k != "cpu"}
    out["ratio_sample"] = out["sample"] / base
    out["ratio_exact"] = out["exact"] / base
    out["udamon_cpu_share"] = {k: statistics.median(v) for k, v in res["cpu"].items()}
    out["raw"] = res
    log(f"  cost: writes/s unmonitored {base / 1e6:.1f} M, sampled x{out['ratio_sample']:.3f}, "
        f"exact x{out['ratio_exact']:.3f}; udamon CPU {out['udamon_cpu_share']}")
    return out


def markdown(res: dict) -> list[str]:
    out = []
    vr = res.get("vms")
    if vr:
        out += ["Three TCG VMs dirtying 200 / 2000 / 20000 random pages per second of 128 MiB "
                "(bare-metal guests: their only writes are the dirtier's, counted by it). "
                "Rates in MiB/s; ratio = estimate / the guest's own count over the same "
                "time; QEMU reports whole MiB/s.", "",
                "| run | VM | truth | udamon (defaults) | 95% interval | converged | "
                "udamon --exact | QEMU 512 | QEMU 16384 |", "|---|---|---|---|---|---|---|---|---|"]
        for i, row in enumerate(vr["runs"]):
            for rate, x in sorted(row["vms"].items(), key=lambda kv: int(kv[0])):
                tr = x["truth_bps"]
                q1 = x["qemu512_mib_s"] * MIB / x["qemu512_truth_bps"]
                q2 = x["qemu16384_mib_s"] * MIB / x["qemu16384_truth_bps"]
                out.append(
                    f"| {i + 1} | {rate} pages/s | {tr / MIB:.3f} | {x['udamon_bps'] / MIB:.3f} "
                    f"(x{x['udamon_bps'] / tr:.3f}) | {x['low_bps'] / MIB:.3f} .. "
                    f"{x['high_bps'] / MIB:.3f} | {x['converged_after_ns'] / 1e9:.1f} s | "
                    f"{x['exact_bps'] / MIB:.3f} (x{x['exact_bps'] / x['exact_truth_bps']:.3f}) | "
                    f"{x['qemu512_mib_s']} (x{q1:.2f}) | {x['qemu16384_mib_s']} (x{q2:.2f}) |")
        out.append("")
        orders = [r["udamon_order"] for r in vr["runs"]]
        out.append(f"Ranking (slowest first): udamon {orders}; QEMU (512) "
                   f"{[r['qemu512_order'] for r in vr['runs']]}"
                   + (" (with ties)" if any(r["qemu512_ties"] for r in vr["runs"]) else "")
                   + ". udamon's CPU per run: "
                   + ", ".join(f"{r['udamon_cpu_s']:.2f} s" for r in vr["runs"])
                   + " (defaults), " + ", ".join(f"{r['exact_cpu_s']:.2f} s"
                                                  for r in vr["runs"]) + " (--exact, 4 s).")
        out.append("")
    lx = res.get("linux")
    if lx:
        out += [f"A Linux guest (the guest tier's 7.3 kernel, the dirtier as init) at 2000 "
                f"pages/s: the dirtier counts {lx['truth_bps'] / MIB:.2f} MiB/s of its own; "
                f"udamon {lx['udamon_bps'] / MIB:.2f} (defaults), {lx['exact_bps'] / MIB:.2f} "
                f"(--exact); QEMU (16384 pages/GiB) {lx['qemu16384_mib_s']}: the guest kernel "
                "dirties RAM too (timers, per-cpu data, slab), which both see and the dirtier "
                "cannot count.", ""]
    c = res.get("cost")
    if c:
        out += ["Cost on the target: a process writing random pages of 256 MiB as fast as it "
                "can (every page dirtied each second), writes per second, median of "
                f"{len(c['raw']['none'])} alternating runs of 6 s:", "",
                "| | writes/s | ratio | udamon CPU (share of one CPU) |", "|---|---|---|---|",
                f"| unmonitored | {c['none'] / 1e6:.2f} M | 1 | |",
                f"| udamon dirty-rate (sampled) | {c['sample'] / 1e6:.2f} M | "
                f"{c['ratio_sample']:.3f} | {c['udamon_cpu_share']['sample']:.1%} |",
                f"| udamon dirty-rate --exact | {c['exact'] / 1e6:.2f} M | "
                f"{c['ratio_exact']:.3f} | {c['udamon_cpu_share']['exact']:.1%} |", ""]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--linux", action="store_true", help="also a Linux guest")
    ap.add_argument("--cost", action="store_true", help="also the cost on a host target")
    ap.add_argument("--no-vms", action="store_true", help="skip the three VMs")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_dirty.py: needs root", file=sys.stderr)
        return 1

    def log(s):
        print(s, file=sys.stderr, flush=True)

    res = run(a.runs, log, vms=not a.no_vms, linux=a.linux, cost=a.cost)
    print("\n".join(markdown(res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def run(runs: int, log, *, vms: bool = True, linux: bool = True, cost: bool = True) -> dict:
    res: dict = {}
    if vms:
        res["vms"] = vm_runs(runs, log)
    if linux:
        res["linux"] = linux_run(log)
    if cost:
        res["cost"] = cost_runs(runs, log)
    return res


if __name__ == "__main__":
    sys.exit(main())
