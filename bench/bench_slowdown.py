"""Target slowdown under each live primitive (and the kernel's DAMON) versus unmonitored.

    sudo .venv/bin/python bench/bench_slowdown.py [--repeat 5] [--duration 4]

Workloads: tests/workloads/access_pattern (reader pinned to CPU 0, writer to
CPU 1, 64 MiB buffers (--size); throughput = reader + writer passes per second) and
stress-ng --vm (2 workers x 128 MiB, inc-nybble; bogo ops/s, real time),
installed with apt-get when missing; and "write" (wp_torture write: one thread
pinned to CPU 1 storing a word per 64-byte line over --size MiB, pass after
pass: the write-heavy workload of the wp primitive's goal).  Conditions run alternately in every
repeat (ABAB..., the order flipped on odd repeats): none; udamon record
--primitive P -- COMMAND for each live primitive P (whole target lifetime
monitored, DAMON default attributes); kernel DAMON paddr over all of System
RAM, and kernel DAMON vaddr on the workload process (access_pattern only:
stress-ng's workers are other processes), when this machine lets us start a
kdamond.  Prints median, spread and
the ratio monitored/unmonitored (goal: slowdown <= 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from common import (
    UDAMON,
    build,
    ensure_debian_package,
    finish_json_workload,
    fmt_num,
    read_record,
    summary,
)

GOAL_PCT = 1.0


def system_ram_ranges() -> list[tuple[int, int]]:
    out = []
    with open("/proc/iomem") as f:
        for line in f:
            if not line.startswith(" ") and line.rstrip().endswith("System RAM"):
                a, b = line.split(":")[0].strip().split("-")
                out.append((int(a, 16), int(b, 16) + 1))
    return out


def access_pattern_cmd(duration: float, size_mib: int = 64) -> list[str]:
    return [build("access_pattern"), "--duration", str(duration), "--size", str(size_mib),
            "--reader-cpu", "0", "--writer-cpu", "1"]


def write_cmd(duration: float, size_mib: int = 64) -> list[str]:
    """One thread pinned to CPU 1 storing a word per 64-byte line over the buffer."""
    return [build("wp_torture"), "write", str(duration), str(size_mib), "1"]


def stress_cmd(duration: float, yaml_path: str) -> list[str]:
    return ["stress-ng", "--vm", "2", "--vm-bytes", "128M", "--vm-keep", "--vm-method",
            "inc-nybble", "-t", str(int(duration)), "--metrics-brief", "--yaml", yaml_path]


def _stress_rate(yaml_path: str) -> float:
    with open(yaml_path) as f:
        m = re.search(r"bogo-ops-per-second-real-time:\s*([0-9.]+)", f.read())
    if not m:
        raise RuntimeError("stress-ng wrote no bogo-ops-per-second-real-time")
    return float(m.group(1))


def one_run(workload: str, cond: str, duration: float, size_mib: int = 64
            ) -> tuple[float, dict]:
    """One run: (throughput, extra info)."""
    tmp = tempfile.mkdtemp(prefix="udamon-bench-")
    yaml_path = os.path.join(tmp, "sng.yaml")
    cmd = (access_pattern_cmd(duration, size_mib) if workload == "access_pattern"
           else write_cmd(duration, size_mib) if workload == "write"
           else stress_cmd(duration, yaml_path))
    extra: dict = {}
    rec = os.path.join(tmp, "rec.jsonl")
    kd = None
    if cond in ("none", "kdamond", "kdamond-vaddr"):
        argv = cmd
    else:
        argv = [*UDAMON, "record", "--primitive", cond, "-q", "-o", rec, "--", *cmd]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if cond == "kdamond":
            from udamon.system.kernel_damon import KernelDamon

            kd = KernelDamon()
            kd.start(system_ram_ranges())
        elif cond == "kdamond-vaddr":
            from udamon.system.kernel_damon import KernelDamon

            kd = KernelDamon(ops="vaddr")
            kd.start([], pid=p.pid)
        if workload == "access_pattern":
            end = finish_json_workload(p, timeout=duration + 60)
            if not end.get("intact"):
                raise RuntimeError(f"workload corrupted under {cond}: {end}")
            rate = (end["passes_r"] + end["passes_w"]) / duration
        elif workload == "write":
            end = finish_json_workload(p, timeout=duration + 60)
            if not end.get("intact"):
                raise RuntimeError(f"workload corrupted under {cond}: {end}")
            rate = end["rate"]
        else:
            p.wait(duration + 60)
            rate = _stress_rate(yaml_path)
    finally:
        if kd is not None:
            kd.stop()
        if p.poll() is None:
            p.terminate()
            p.wait(10)
    if p.returncode != 0:
        err = (p.stderr.read().strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{cond} on {workload}: rc {p.returncode}: {err}")
    if cond not in ("none", "kdamond", "kdamond-vaddr") and os.path.exists(rec):
        _, snaps, endl = read_record(rec)
        nreg = sorted(len(sn["regions"]) for sn in snaps)
        extra = {"snapshots": len(snaps), "reports": endl.get("reports"),
                 "regions_median": nreg[len(nreg) // 2] if nreg else 0,
                 "lost_samples": endl.get("lost_samples"),
                 "dropped_reports": endl.get("dropped_reports")}
    subprocess.run(["rm", "-rf", tmp])
    return rate, extra


def probe_condition(cond: str) -> tuple[bool, str]:
    """Can this condition run here?  (ok, one-line reason)."""
    if cond == "none":
        return True, ""
    if cond in ("kdamond", "kdamond-vaddr"):
        from udamon.system.kernel_damon import kernel_damon_available

        return kernel_damon_available(ops="vaddr" if cond == "kdamond-vaddr" else "paddr")
    try:
        one_run("access_pattern", cond, 1.0)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return False, str(e).splitlines()[0]
    return True, ""


def run(repeat: int = 5, duration: float = 4.0, primitives=("hint", "wp"),
        workloads=("access_pattern", "stress-ng"), log=print, size_mib: int = 64) -> dict:
    conds, unavailable = ["none"], {}
    for c in [*primitives, "kdamond", "kdamond-vaddr"]:
        ok, why = probe_condition(c)
        if ok:
            conds.append(c)
        else:
            unavailable[c] = why
            log(f"  {c}: not available: {why}")
    workloads = dict.fromkeys(workloads, "")
    if "stress-ng" in workloads:
        ok, why = ensure_debian_package("stress-ng", "stress-ng")
        if not ok:
            workloads["stress-ng"] = why
        elif why:
            log(f"  {why}")
    results = {}
    for wl, skip in workloads.items():
        if skip:
            results[wl] = {"skipped": skip}
            continue
        wconds = [c for c in conds if not (c == "kdamond-vaddr" and wl == "stress-ng")]
        rates: dict[str, list[float]] = {c: [] for c in wconds}
        pair: dict[str, list[float]] = {c: [] for c in wconds}
        extras: dict[str, list[dict]] = {c: [] for c in wconds}
        for i in range(repeat):
            order = wconds if i % 2 == 0 else wconds[::-1]
            this = {}
            for c in order:
                rate, extra = one_run(wl, c, duration, size_mib)
                this[c] = rate
                rates[c].append(rate)
                if extra:
                    extras[c].append(extra)
                log(f"  {wl:14s} rep {i} {c:8s} {rate:12.1f}/s {extra or ''}")
            for c in wconds:
                pair[c].append(this[c] / this["none"])
        base = summary(rates["none"])["median"]
        rows = {}
        for c in wconds:
            s = summary(rates[c])
            ratio = s["median"] / base
            rows[c] = {"throughput": s, "ratio": ratio, "slowdown_pct": (1 - ratio) * 100,
                       "paired_ratio": summary(pair[c]),
                       "goal_met": c == "none" or (1 - ratio) * 100 <= GOAL_PCT,
                       "runs": extras[c]}
        results[wl] = {"unit": {"access_pattern": "reader+writer passes/s",
                                "write": "writer passes/s"}.get(wl, "bogo ops/s (real time)"),
                       "conditions": rows}
    return {"repeat": repeat, "duration_s": duration, "goal_pct": GOAL_PCT, "size_mib": size_mib,
            "unavailable": unavailable, "workloads": results}


def markdown(res: dict) -> list[str]:
    out = [f"Each condition run {res['repeat']} times, alternating, {res['duration_s']:g} s "
           "per run; ratio = median monitored / median unmonitored (paired: each "
           "repeat's monitored run over that repeat's unmonitored run, min..max).", "",
           "| workload | condition | median | spread | ratio | paired ratio min..max | "
           "slowdown | goal <= 1% |", "|---|---|---|---|---|---|---|---|"]
    names = {"none": "unmonitored", "kdamond": "kernel DAMON paddr (all RAM)",
             "kdamond-vaddr": "kernel DAMON vaddr (the workload)"}
    for wl, r in res["workloads"].items():
        if "skipped" in r:
            out.append(f"| {wl} | – | skipped: {r['skipped']} | | | | | |")
            continue
        for c, row in r["conditions"].items():
            s = row["throughput"]
            pr = row["paired_ratio"]
            goal = "–" if c == "none" else ("met" if row["goal_met"] else
                                            f"missed by {row['slowdown_pct'] - GOAL_PCT:.1f} pp")
            out.append(f"| {wl} | {names.get(c, 'udamon ' + c)} | {fmt_num(s['median'])} "
                       f"{r['unit']} | {s['spread_pct']:.1f}% | {row['ratio']:.3f} | "
                       f"{pr['min']:.3f}..{pr['max']:.3f} | {row['slowdown_pct']:.1f}% | "
                       f"{goal} |")
        for c, why in res["unavailable"].items():
            out.append(f"| {wl} | {names.get(c, 'udamon ' + c)} | not available: {why} "
                       "| | | | | |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--primitives", default="hint,wp",
                    help="comma-separated live primitives to try ('' for none)")
    ap.add_argument("--workloads", default="access_pattern,stress-ng")
    ap.add_argument("--size", type=int, default=64, help="access_pattern MiB per buffer")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    t = time.monotonic()
    res = run(a.repeat, a.duration, [p for p in a.primitives.split(",") if p],
              a.workloads.split(","), log=lambda s: print(s, file=sys.stderr, flush=True),
              size_mib=a.size)
    print("\n".join(markdown(res)))
    print(f"({time.monotonic() - t:.0f} s)", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
