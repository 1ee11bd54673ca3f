"""What the hint primitive costs udamon: steady CPU with no faults, and CPU per fault.

    sudo .venv/bin/python bench/bench_hint_cost.py [--rates 0,10000,100000] [--window 20]

``bench/workloads/faults.c`` makes user page faults at a chosen rate (touch a
page, drop it with MADV_DONTNEED, touch it again); hint reads every user page
fault of its target from the ``exceptions:page_fault_user`` tracepoint, so each
one becomes a report whether or not NUMA balancing hinted it.  For each rate,
``udamon record --primitive hint --pid PID`` runs at its defaults and its CPU
time (utime + stime from /proc/PID/stat, so start-up is left out) is read over
``--window`` seconds after a 3 s warm-up.  CPU per fault = (CPU at the rate -
CPU at rate 0) / reports recorded in the window; lost samples come from the
record's end line.  The cost of looking up each report's page node (move_pages,
on by default) is read from the record's end notes: CPU per report, and its
share of udamon's CPU.
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

from common import CLK_TCK, UDAMON, build, start_json_workload

WARMUP_S = 3.0


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def one(rate: int, window: float) -> dict:
    wl, info = start_json_workload([build("faults"), str(rate), str(window + WARMUP_S + 30)])
    fd, rec = tempfile.mkstemp(prefix="udamon-bench-", suffix=".jsonl")
    os.close(fd)
    try:
        mon = subprocess.Popen([*UDAMON, "record", "--primitive", "hint", "-q", "--pid",
                                str(info["pid"]), "--duration", f"{window + WARMUP_S + 1}s",
                                "-o", rec], stderr=subprocess.PIPE, text=True)
        time.sleep(WARMUP_S)
        t0, c0 = time.monotonic(), _ticks(mon.pid)
        time.sleep(window)
        t1, c1 = time.monotonic(), _ticks(mon.pid)
        _, err = mon.communicate(timeout=120)
        if mon.returncode != 0:
            raise RuntimeError(f"udamon record failed: {err.strip()[-300:]}")
        with open(rec) as f:
            lines = [json.loads(x) for x in f if x.strip()]
    finally:
        wl.terminate()
        wl.wait(30)
        os.unlink(rec)
    end = lines[-1]["end"]
    snaps = [x for x in lines[1:] if "regions" in x]
    # reports of the snapshots inside the measured window (snapshot times are monotonic)
    start_ns = snaps[0]["time_ns"] - snaps[0]["aggr_us"] * 1000 if snaps else 0
    win = [s for s in snaps if WARMUP_S * 1e9 <= s["time_ns"] - start_ns
           <= (WARMUP_S + (t1 - t0)) * 1e9]
    reports = sum(s["nr_reports"] for s in win)
    cpu_s = (c1 - c0) / CLK_TCK
    lookup = {}
    for note in end.get("notes", []):
        m = re.search(r"page nodes: (\d+) reports .* \(([0-9.]+) ms of CPU, ([0-9.]+) us per "
                      r"report\)", note)
        if m:
            session_s = window + WARMUP_S + 1
            lookup = {"lookup_reports": int(m.group(1)), "lookup_cpu_s": float(m.group(2)) / 1e3,
                      "lookup_us_per_report": float(m.group(3)),
                      "lookup_cpu_pct": float(m.group(2)) / 1e3 / session_s * 100}
    return {"rate": rate, "window_s": t1 - t0, "cpu_s": cpu_s, **lookup,
            "cpu_pct": cpu_s / (t1 - t0) * 100, "reports_in_window": reports,
            "reports_per_s": reports / (t1 - t0), "lost_samples": end.get("lost_samples", 0),
            "snapshots": len(snaps)}


def run(rates=(0, 10_000, 100_000), window: float = 20.0, log=print) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root"}
    from udamon.primitives.hint import hint_available

    ok, why = hint_available()
    if not ok:
        return {"skipped": why}
    rows = []
    for rate in rates:
        r = one(rate, window)
        rows.append(r)
        log(f"  hint at {rate:,} faults/s: {r['cpu_pct']:.2f}% of a CPU, "
            f"{r['reports_per_s']:,.0f} reports/s, lost {r['lost_samples']}")
    idle = next((r for r in rows if r["rate"] == 0), None)
    for r in rows:
        if idle is not None and r is not idle and r["reports_in_window"]:
            r["us_per_fault"] = ((r["cpu_s"] - idle["cpu_s"] * r["window_s"] / idle["window_s"])
                                 / r["reports_in_window"] * 1e6)
    return {"window_s": window, "rows": rows}


def markdown(res: dict) -> list[str]:
    if "skipped" in res:
        return [f"skipped: {res['skipped']}"]
    out = ["| faults/s asked | reports/s seen | udamon CPU (% of one CPU) | CPU per fault | "
           "lost samples | page-node lookup: CPU per report | lookup share of udamon's CPU |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        per = f"{r['us_per_fault']:.2f} us" if "us_per_fault" in r else "–"
        lk = (f"{r['lookup_us_per_report']:.2f} us" if "lookup_us_per_report" in r else "–")
        share = (f"{r['lookup_cpu_pct'] / r['cpu_pct'] * 100:.0f}%"
                 if "lookup_cpu_pct" in r and r["cpu_pct"] else "–")
        out.append(f"| {r['rate']:,} | {r['reports_per_s']:,.0f} | {r['cpu_pct']:.2f}% | "
                   f"{per} | {r['lost_samples']} | {lk} | {share} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="0,10000,100000")
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    try:
        rates = tuple(int(x) for x in a.rates.split(","))
    except ValueError:
        ap.error("--rates: comma-separated numbers")
    res = run(rates, a.window, log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(markdown(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if "skipped" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
