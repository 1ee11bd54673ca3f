"""Throughput cost of the wp primitive on a write-heavy workload.

    sudo .venv/bin/python bench/bench_wp_overhead.py [--runs 5] [--duration 3]
        [--regions 100] [--sample-us 5000] [--no-attribution]

The workload is ``wp_torture write`` (tests/workloads/wp_torture.c): one
thread pinned to CPU 1 storing one word per 64-byte line over a ``--mib`` MiB
anonymous buffer, pass after pass.  Its passes per second are measured
unmonitored and monitored by WpPrimitive (the monitor pinned to CPU 0, DAMON
defaults: 5 ms sampling; ``--regions`` equal regions over the buffer, one
random page armed per region per interval, then one poll), alternating,
``--runs`` times each.  Prints median, spread (min..max) and the ratio
monitored/unmonitored.

``--cli`` measures ``udamon record --primitive wp --pid PID`` at its default
settings instead (adaptive regions, 50 ms sampling, 1 s aggregation),
attached 0.3 s after the workload starts, and adds a second, less noisy
ratio: passes per CPU-second of the workload (its rusage), which is immune to
CPU steal and to the scheduler placing other work on the writer's CPU; what
it leaves out is udamon's own CPU time, reported separately.  ``--primitive
hint`` measures 'udamon record --primitive hint' the same way (the workload's
own time then includes its hinting faults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from workloads.build import build  # noqa: E402

from udamon.primitives.uffd import WpPrimitive, wp_available  # noqa: E402


def one_run(binary: str, duration: float, mib: int, monitored: bool, regions: int,
            sample_us: int, attribute: bool) -> tuple[float, dict]:
    p = subprocess.Popen([binary, "write", str(duration), str(mib), "1"],
                         stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    extra: dict = {}
    if monitored:
        pid = info["pid"]
        w = WpPrimitive([pid], attribute=attribute)
        w.start([pid])
        lo, hi = info["buf"]
        edges = np.linspace(lo, hi, regions + 1).astype(np.uint64)
        b = np.stack([edges[:-1], edges[1:]], axis=1)
        rng = np.random.default_rng(0)
        width = b[:, 1] - b[:, 0]
        n_rep = arm_t = poll_t = ticks = 0
        nxt = time.monotonic()
        while p.poll() is None:
            t0 = time.perf_counter()
            addrs = b[:, 0] + (rng.random(b.shape[0]) * width).astype(np.uint64)
            w.arm(pid, addrs)
            t1 = time.perf_counter()
            nxt += sample_us / 1e6
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t2 = time.perf_counter()
            n_rep += w.poll(time.monotonic_ns()).size
            t3 = time.perf_counter()
            arm_t += t1 - t0
            poll_t += t3 - t2
            ticks += 1
            w.exited()
        w.stop()
        extra = {"reports": n_rep, "ticks": ticks, "arm_us": arm_t / max(1, ticks) * 1e6,
                 "poll_us": poll_t / max(1, ticks) * 1e6, "lost": w.stats().lost_samples}
    end = json.loads(p.stdout.readline())
    p.wait()
    if p.returncode != 0 or not end["intact"]:
        raise SystemExit(f"workload failed: rc={p.returncode} {end}")
    return end["rate"], extra


def one_cli_run(binary: str, duration: float, mib: int, monitored: bool,
                primitive: str = "wp") -> dict:
    p = subprocess.Popen([binary, "write", str(duration), str(mib), "1"],
                         stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    mon = None
    with tempfile.TemporaryDirectory(prefix="udamon-bench-") as tmp:
        if monitored:
            time.sleep(0.3)
            mon = subprocess.Popen([sys.executable, "-m", "udamon", "record", "--primitive",
                                    primitive,
                                    "--pid", str(info["pid"]), "-q", "-o", f"{tmp}/r.jsonl"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = json.loads(p.stdout.readline())
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if mon is not None:
            mon.wait(60)
            if mon.returncode != 0:
                raise SystemExit(f"udamon failed: {mon.stderr.read().strip()[-300:]}")
    if p.returncode != 0 or not end["intact"]:
        raise SystemExit(f"workload failed: rc={p.returncode} {end}")
    cpu = ru.ru_utime + ru.ru_stime
    return {"rate": end["rate"], "per_cpu_s": end["passes"] / cpu, "cpu_s": cpu,
            "target_sys_s": ru.ru_stime}


def cli_main(a) -> int:
    binary = build("wp_torture")
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(a.runs):
        for monitored in ((False, True) if i % 2 == 0 else (True, False)):
            before = os.times()
            r = one_cli_run(binary, a.duration, a.mib, monitored, a.primitive)
            after = os.times()
            if monitored:  # children's CPU = the workload's + udamon's
                r["udamon_cpu_s"] = ((after.children_user + after.children_system)
                                     - (before.children_user + before.children_system)
                                     - r["cpu_s"])
            rows[monitored].append(r)
            print(f"run {i} {a.primitive if monitored else 'base':<4} {r['rate']:8.1f} passes/s "
                  f"{r['per_cpu_s']:8.1f} passes/CPU-s "
                  + (f"udamon {r['udamon_cpu_s']:.2f} CPU-s" if monitored else ""), flush=True)

    def med(rs, k):
        return statistics.median(x[k] for x in rs)

    base, mon = rows[False], rows[True]
    print(f"throughput ratio monitored/unmonitored: {med(mon, 'rate') / med(base, 'rate'):.4f}")
    eff = med(mon, "per_cpu_s") / med(base, "per_cpu_s")
    print(f"work per CPU-second ratio: {eff:.4f}  (slowdown {(1 - eff) * 100:.2f}%)")
    print(f"target system time: {med(base, 'target_sys_s'):.3f} s -> "
          f"{med(mon, 'target_sys_s'):.3f} s per run; udamon CPU "
          f"{med(mon, 'udamon_cpu_s'):.2f} s per {a.duration:g} s run "
          f"({med(mon, 'udamon_cpu_s') / a.duration * 100:.1f}% of one CPU, incl. start-up)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--regions", type=int, default=100)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--sample-us", type=int, default=5000)
    ap.add_argument("--no-attribution", action="store_true")
    ap.add_argument("--cli", action="store_true",
                    help="measure 'udamon record --primitive wp' at its defaults")
    ap.add_argument("--primitive", choices=("wp", "hint"), default="wp",
                    help="with --cli: the primitive to measure (default wp)")
    a = ap.parse_args()
    if a.cli and a.primitive == "hint":
        return cli_main(a)
    ok, why = wp_available()
    if not ok:
        print(f"wp unavailable: {why}", file=sys.stderr)
        return 1
    if a.cli:
        return cli_main(a)
    os.sched_setaffinity(0, {0})
    binary = build("wp_torture")
    base, mon, extras = [], [], []
    for i in range(a.runs):
        for monitored in ((False, True) if i % 2 == 0 else (True, False)):
            rate, extra = one_run(binary, a.duration, a.mib, monitored, a.regions, a.sample_us,
                                  not a.no_attribution)
            (mon if monitored else base).append(rate)
            if monitored:
                extras.append(extra)
            print(f"run {i} {'wp  ' if monitored else 'base'} {rate:9.1f} passes/s {extra}",
                  flush=True)

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.1f}  spread {min(xs):.1f}..{max(xs):.1f}"

    ratio = statistics.median(mon) / statistics.median(base)
    print(f"unmonitored: {fmt(base)} passes/s")
    print(f"monitored:   {fmt(mon)} passes/s  ({a.regions} regions, "
          f"{a.sample_us} us sampling, attribution {'off' if a.no_attribution else 'on'})")
    print(f"monitor cost per interval: arm {statistics.median(e['arm_us'] for e in extras):.0f} us"
          f", poll {statistics.median(e['poll_us'] for e in extras):.0f} us")
    print(f"ratio monitored/unmonitored: {ratio:.4f}  (slowdown {(1 - ratio) * 100:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
