"""Monitor cost and scale: udamon's CPU use and peak RSS as the target's touched memory
and thread count grow, for each live primitive at its default attributes.

    sudo .venv/bin/python bench/bench_scale.py [--repeat 3] [--duration 5]
        [--sizes 64,512,2048,8192] [--threads 1,2,8,32] [--primitives hint,wp]

Memory: tests/workloads/access_pattern with four buffers of SIZE/4 MiB each
(R, W, S touched all the time, I once).  Threads: bench/workloads/threads.c,
N threads each read-modify-writing its own slice of one 256 MiB buffer.
The workload is started first; then 'udamon record --primitive P --pid PID
--duration D' runs.  Its CPU time (utime + stime from /proc/PID/stat) is
sampled every 0.2 s: "steady CPU" is the slope from the moment the record
header is written (start-up done) to the last snapshot (before the teardown),
in % of one CPU; "total CPU" includes start-up and teardown.
Peak RSS is VmHWM.  (wp's short-lived injection
helper and the settings watchdog are separate processes and not counted.)

What to expect: wp arms one page per region per sampling interval, so its cost
follows the region count (bounded by max_nr_regions), not the memory size.
hint's cost follows the hinting-fault rate, which the kernel's scanner sets: it
scans scan_size MiB per scan period, and a thread triggers a scan only after it
has run a scan period of its own CPU time, so many threads sharing few CPUs
give few faults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import UDAMON, Watched, build, read_record, start_json_workload, summary

MEM_SIZES = (64, 512, 2048, 8192)
THREADS = (1, 2, 8, 32)
PRIMITIVES = ("hint", "wp")


def one_run(kind: str, value: int, duration: float, primitive: str = "hint") -> dict:
    if kind == "mem":
        argv = [build("access_pattern"), "--size", str(max(1, value // 4)),
                "--duration", str(duration + 30)]
    else:
        argv = [build("threads"), "--threads", str(value), "--size", "256",
                "--duration", str(duration + 30)]
    wl, _info = start_json_workload(argv)
    fd, rec = tempfile.mkstemp(prefix="udamon-bench-", suffix=".jsonl")
    os.close(fd)
    os.unlink(rec)
    try:
        w = Watched([*UDAMON, "record", "--primitive", primitive, "-q", "--pid", str(wl.pid),
                     "--duration", f"{duration}s", "-o", rec], settle_file=rec,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rc = w.poll_until_exit(duration + 60)
        if rc != 0:
            raise RuntimeError(f"udamon record --primitive {primitive} exited {rc} "
                               f"({kind}={value})")
        _, snaps, end = read_record(rec)
        total = w.samples[-1][1] if w.samples else None
    finally:
        wl.terminate()
        wl.wait(30)
        if os.path.exists(rec):
            os.unlink(rec)
    return {"steady_cpu_pct": w.steady_cpu_pct(), "total_cpu_s": total,
            "wall_s": w.wall_s, "hwm_mib": w.hwm_kib / 1024, "snapshots": len(snaps),
            "reports": end.get("reports"), "lost_samples": end.get("lost_samples"),
            "dropped_reports": end.get("dropped_reports")}


def run(repeat: int = 3, duration: float = 5.0, sizes=MEM_SIZES, threads=THREADS,
        primitives=PRIMITIVES, log=print) -> dict:
    configs = [(p, "mem", s) for p in primitives for s in sizes] + \
        [(p, "threads", t) for p in primitives for t in threads]
    runs: dict[str, list[dict]] = {f"{p}:{k}={v}": [] for p, k, v in configs}
    for i in range(repeat):
        for p, k, v in (configs if i % 2 == 0 else configs[::-1]):
            r = one_run(k, v, duration, p)
            runs[f"{p}:{k}={v}"].append(r)
            log(f"  {p:<4} {k}={v:<5} rep {i}: steady {r['steady_cpu_pct'] or 0:5.1f}% CPU, "
                f"RSS {r['hwm_mib']:6.1f} MiB, {r['reports']} reports, "
                f"lost {r['lost_samples']}")
    rows = []
    for p, k, v in configs:
        rs = runs[f"{p}:{k}={v}"]
        rows.append({"primitive": p, "kind": k, "value": v,
                     "steady_cpu_pct": summary([r["steady_cpu_pct"] for r in rs
                                                if r["steady_cpu_pct"] is not None]),
                     "total_cpu_s": summary([r["total_cpu_s"] or 0 for r in rs]),
                     "hwm_mib": summary([r["hwm_mib"] for r in rs]),
                     "reports": summary([r["reports"] or 0 for r in rs]),
                     "lost_samples": sum(r["lost_samples"] or 0 for r in rs),
                     "dropped_reports": sum(r["dropped_reports"] or 0 for r in rs)})
    return {"repeat": repeat, "duration_s": duration, "primitives": list(primitives),
            "rows": rows}


def markdown(res: dict) -> list[str]:
    out = [f"udamon record --primitive P --pid PID --duration {res['duration_s']:g}s at the "
           f"default attributes, {res['repeat']} repeats each (configurations interleaved).",
           "",
           "| primitive | target | steady CPU (% of one CPU) | spread | total CPU s "
           "(incl. start-up, teardown) | peak RSS (VmHWM) | reports per run | lost/dropped |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        what = (f"access_pattern, {r['value']} MiB touched" if r["kind"] == "mem"
                else f"threads.c, {r['value']} thread(s), 256 MiB")
        c, t, h, n = r["steady_cpu_pct"], r["total_cpu_s"], r["hwm_mib"], r["reports"]
        cpu = f"{c['median']:.1f}%" if c.get("n") else "–"
        sp = f"{c['min']:.1f}..{c['max']:.1f}" if c.get("n") else "–"
        out.append(f"| {r.get('primitive', 'hint')} | {what} | {cpu} | {sp} | "
                   f"{t['median']:.2f} | {h['median']:.0f} MiB | "
                   f"{n['median']:,.0f} | {r['lost_samples']}/{r['dropped_reports']} |")
    return out


def plot(res: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    colors = {"hint": "tab:blue", "wp": "tab:green"}
    for col, (kind, label) in enumerate((("mem", "touched memory (MiB)"),
                                         ("threads", "threads"))):
        for prim in res.get("primitives", ["hint"]):
            rows = [r for r in res["rows"] if r["kind"] == kind
                    and r.get("primitive", "hint") == prim and r["steady_cpu_pct"].get("n")]
            xs = [r["value"] for r in rows]
            c = colors.get(prim)
            axes[0][col].plot(xs, [r["steady_cpu_pct"]["median"] for r in rows], "o-",
                              color=c, label=prim)
            axes[1][col].plot(xs, [r["hwm_mib"]["median"] for r in rows], "s--", color=c,
                              label=prim)
        axes[0][col].set_ylabel("udamon steady CPU (% of one CPU)")
        axes[1][col].set_ylabel("udamon peak RSS (MiB)")
        axes[1][col].set_xlabel(label)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.legend()
            ax.grid(alpha=0.3)
    fig.suptitle("udamon monitor cost vs target memory and threads")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--sizes", default=",".join(map(str, MEM_SIZES)))
    ap.add_argument("--threads", default=",".join(map(str, THREADS)))
    ap.add_argument("--primitives", default=",".join(PRIMITIVES))
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    res = run(a.repeat, a.duration, [int(x) for x in a.sizes.split(",")],
              [int(x) for x in a.threads.split(",")], a.primitives.split(","),
              log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(markdown(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
