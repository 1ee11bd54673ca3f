"""Monitor cost and scale: udamon's CPU use and peak RSS as the target's touched memory
and thread count grow (hint primitive, DAMON default attributes).

    sudo .venv/bin/python bench/bench_scale.py [--repeat 3] [--duration 5]
        [--sizes 64,256,1024,2048] [--threads 1,2,8,32]

Memory: tests/workloads/access_pattern with four buffers of SIZE/4 MiB each
(R, W, S touched all the time, I once).  Threads: bench/workloads/threads.c,
N threads each read-modify-writing its own slice of one 256 MiB buffer.
The workload is started first; then 'udamon record --primitive hint --pid PID
--duration D' runs.  Its CPU time (utime + stime from /proc/PID/stat) is
sampled every 0.2 s: "steady CPU" is the slope from the moment the record
header is written (start-up done) to the end, in % of one CPU; "total CPU"
includes Python start-up.  Peak RSS is VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import UDAMON, Watched, build, read_record, start_json_workload, summary

MEM_SIZES = (64, 256, 1024, 2048)
THREADS = (1, 2, 8, 32)


def one_run(kind: str, value: int, duration: float) -> dict:
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
        w = Watched([*UDAMON, "record", "--primitive", "hint", "-q", "--pid", str(wl.pid),
                     "--duration", f"{duration}s", "-o", rec], settle_file=rec,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rc = w.poll_until_exit(duration + 60)
        if rc != 0:
            raise RuntimeError(f"udamon record exited {rc} ({kind}={value})")
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
        log=print) -> dict:
    configs = [("mem", s) for s in sizes] + [("threads", t) for t in threads]
    runs: dict[str, list[dict]] = {f"{k}={v}": [] for k, v in configs}
    for i in range(repeat):
        for k, v in (configs if i % 2 == 0 else configs[::-1]):
            r = one_run(k, v, duration)
            runs[f"{k}={v}"].append(r)
            log(f"  {k}={v:<5} rep {i}: steady {r['steady_cpu_pct'] or 0:5.1f}% CPU, "
                f"RSS {r['hwm_mib']:6.1f} MiB, {r['reports']} reports, "
                f"lost {r['lost_samples']}")
    rows = []
    for k, v in configs:
        rs = runs[f"{k}={v}"]
        rows.append({"kind": k, "value": v,
                     "steady_cpu_pct": summary([r["steady_cpu_pct"] for r in rs
                                                if r["steady_cpu_pct"] is not None]),
                     "total_cpu_s": summary([r["total_cpu_s"] or 0 for r in rs]),
                     "hwm_mib": summary([r["hwm_mib"] for r in rs]),
                     "reports": summary([r["reports"] or 0 for r in rs]),
                     "lost_samples": sum(r["lost_samples"] or 0 for r in rs),
                     "dropped_reports": sum(r["dropped_reports"] or 0 for r in rs)})
    return {"repeat": repeat, "duration_s": duration, "rows": rows}


def markdown(res: dict) -> list[str]:
    out = [f"udamon record --primitive hint --pid PID --duration {res['duration_s']:g}s, "
           f"{res['repeat']} repeats each (configurations interleaved).", "",
           "| target | steady CPU (% of one CPU) | spread | total CPU s (incl. start-up) | "
           "peak RSS (VmHWM) | reports per run | lost/dropped |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        what = (f"access_pattern, {r['value']} MiB touched" if r["kind"] == "mem"
                else f"threads.c, {r['value']} thread(s), 256 MiB")
        c, t, h, n = r["steady_cpu_pct"], r["total_cpu_s"], r["hwm_mib"], r["reports"]
        cpu = f"{c['median']:.1f}%" if c.get("n") else "–"
        sp = f"{c['min']:.1f}..{c['max']:.1f}" if c.get("n") else "–"
        out.append(f"| {what} | {cpu} | {sp} | {t['median']:.2f} | {h['median']:.0f} MiB | "
                   f"{n['median']:,.0f} | {r['lost_samples']}/{r['dropped_reports']} |")
    return out


def plot(res: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, label in ((axes[0], "mem", "touched memory (MiB)"),
                            (axes[1], "threads", "threads")):
        rows = [r for r in res["rows"] if r["kind"] == kind and r["steady_cpu_pct"].get("n")]
        xs = [r["value"] for r in rows]
        ax.plot(xs, [r["steady_cpu_pct"]["median"] for r in rows], "o-", label="CPU %")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("udamon CPU (% of one CPU)")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["hwm_mib"]["median"] for r in rows], "s--", color="tab:red")
        ax2.set_ylabel("peak RSS (MiB)", color="tab:red")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
    fig.suptitle("udamon (hint) monitor cost")
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
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    res = run(a.repeat, a.duration, [int(x) for x in a.sizes.split(",")],
              [int(x) for x in a.threads.split(",")],
              log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(markdown(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
