"""The reliability campaign's figures (issue 15): inputs tried per parser with 0 internal
errors, attach/detach cycles and SIGKILLs with 0 harmed targets, and what wp's
splitting of transparent huge pages costs a THP-backed target.

    .venv/bin/python bench/bench_campaign.py [--quick] [--json FILE]      (as root)

It runs the soak versions of tests/test_fuzz.py (>= 10,000 inputs per parser) and
tests/test_campaign.py (220 cycles per primitive, kills at random moments; the stress
targets: 1,000 threads, THP, a forking server, an mremapping heap, each with 20
cycles per primitive) through pytest, collects the counts the tests write, and
measures the THP cost with tests/workloads/campaign.c.  The full run takes about an
hour on a 2-vCPU machine (measured under load 3-14: the fuzzing 34 min, the cycles
17 min, THP 4 min); --quick caps the fuzzing at 300 inputs per test and runs the
normal cycles (~5 min).

``run(quick)`` returns the result dict and ``markdown(res)`` the lines of a
docs/benchmarks.md section, for bench/run_all.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, build

PY = sys.executable


def _pytest(files: list[str], env: dict[str, str], log) -> tuple[int, str]:
    t0 = time.monotonic()
    p = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                       cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    tail = "\n".join(p.stdout.strip().splitlines()[-3:])
    log(f"  pytest {' '.join(files)}: exit {p.returncode} in {time.monotonic() - t0:.0f} s; "
        f"{tail.splitlines()[-1] if tail else ''}")
    return p.returncode, p.stdout[-4000:]


def run_fuzz(quick: bool, log) -> dict:
    with tempfile.TemporaryDirectory() as d:
        stats = Path(d) / "fuzz.json"
        env = {"UDAMON_SOAK": "1", "UDAMON_FUZZ_STATS": str(stats)}
        if quick:
            env["UDAMON_FUZZ_MAX"] = "300"
        t0 = time.monotonic()
        rc, out = _pytest(["tests/test_fuzz.py"], env, log)
        tried = json.loads(stats.read_text()) if stats.exists() else {}
    return {"inputs": tried, "failed": rc != 0, "seconds": time.monotonic() - t0,
            "tail": out if rc else ""}


def run_cycles(quick: bool, log) -> dict:
    with tempfile.TemporaryDirectory() as d:
        stats = Path(d) / "cycles.json"
        env = {"UDAMON_CAMPAIGN_STATS": str(stats)}
        if not quick:
            env["UDAMON_SOAK"] = "1"
        t0 = time.monotonic()
        rc, out = _pytest(["tests/test_campaign.py"], env, log)
        got = json.loads(stats.read_text()) if stats.exists() else {}
    return {"groups": got, "failed": rc != 0, "seconds": time.monotonic() - t0,
            "tail": out if rc else ""}


def _anon_huge_kib(pid: int) -> int:
    tot = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                tot += int(line.split()[1])
    return tot


def _one_thp_run(binary: str, thp: bool, wp: bool, seconds: float) -> dict:
    args = [binary, "checksum", "--threads", "1", "--size", "256", "--duration", str(seconds)]
    if thp:
        args.append("--thp")
    t = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    info = json.loads(t.stdout.readline())
    huge0 = _anon_huge_kib(info["pid"])
    sess = None
    if wp:
        sess = subprocess.Popen([PY, "-m", "udamon", "record", "--primitive", "wp", "--pid",
                                 str(info["pid"]), "-q", "-o", os.devnull, "--duration",
                                 f"{seconds + 5}s"], stderr=subprocess.DEVNULL)
    time.sleep(max(0.0, seconds - 1.0))
    try:
        huge1 = _anon_huge_kib(info["pid"])
    except OSError:
        huge1 = -1
    out = t.stdout.read()
    # its own CPU time (user + system: wp's faults and splits included) from wait4, so
    # that other jobs on the machine do not count as a cost
    _, status, ru = os.wait4(t.pid, 0)
    t.returncode = os.waitstatus_to_exitcode(status)
    end = json.loads(out.strip().splitlines()[-1])
    if sess is not None:
        sess.wait(60)
    cpu = ru.ru_utime + ru.ru_stime
    return {"passes_per_s": end["passes"] / seconds, "passes_per_cpu_s": end["passes"] / cpu,
            "cpu_s": cpu, "intact": end["intact"], "exit": t.returncode,
            "thp_kib_start": huge0, "thp_kib_end": huge1}


def run_thp(quick: bool, log) -> dict:
    """A 256 MiB writer (verifies and rewrites one word per 64-byte line, pass after pass)
    with and without THP, unmonitored and under wp: passes/s and the huge pages left
    (wp's first write-protect of a 4 KiB page of a huge page splits its mapping).  Work is
    counted per CPU-second of the target (wait4's rusage), not per wall second."""
    binary = build("campaign")
    seconds = 4.0 if quick else 10.0
    reps = 1 if quick else 5
    out: dict[str, list] = {}
    for thp in (True, False):
        for wp in (False, True):
            key = f"{'thp' if thp else '4k'}-{'wp' if wp else 'alone'}"
            out[key] = [_one_thp_run(binary, thp, wp, seconds) for _ in range(reps)]
            log(f"  {key}: {[round(r['passes_per_cpu_s'], 2) for r in out[key]]} passes per "
                f"CPU-s, THP "
                f"KiB {[(r['thp_kib_start'], r['thp_kib_end']) for r in out[key]]}")
    return {"seconds": seconds, "runs": out}


def run(quick: bool = False, log=print) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("bench_campaign: needs root (the live primitives)")
    return {"quick": quick, "fuzz": run_fuzz(quick, log), "cycles": run_cycles(quick, log),
            "thp": run_thp(quick, log)}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _readable(runs: list[dict]) -> dict:
    """The first run whose late THP reading was taken (-1: the target had ended)."""
    return next((r for r in runs if r["thp_kib_end"] >= 0), runs[0])


def markdown(res: dict) -> list[str]:
    lines = ["## 9. Reliability campaign (bench/bench_campaign.py)"]
    if res.get("notes"):
        lines += [""] + list(res["notes"])
    fz = res.get("fuzz") or {}
    if fz.get("inputs"):
        lines += ["", "Property-based fuzzing (hypothesis, tests/test_fuzz.py --soak): inputs "
                  f"tried per parser, {'FAILURES' if fz['failed'] else '0 internal errors'} "
                  f"({fz['seconds'] / 60:.0f} min):", "", "| parser | inputs |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in sorted(fz["inputs"].items())]
    cy = res.get("cycles") or {}
    if cy.get("groups"):
        lines += ["", "Attach/detach cycles (tests/test_campaign.py"
                  + ("" if res.get("quick") else " --soak") + f", {cy['seconds'] / 60:.0f} min;"
                  f" {'FAILURES' if cy['failed'] else '0 targets corrupted, hung or killed'}):",
                  "", "| target:primitive | cycles | SIGKILLs (start-up / recording) | "
                  "SIGTERMs | clean ends | settings checked | targets intact |",
                  "|---|---|---|---|---|---|---|"]
        for k, c in sorted(cy["groups"].items()):
            lines.append(
                f"| {k} | {c.get('cycles', 0)} | {c.get('sigkills', 0)} ("
                f"{c.get('sigkills during start-up (injection, settings, tracer)', 0)} / "
                f"{c.get('sigkills while recording', 0)}) | {c.get('sigterms', 0)} | "
                f"{c.get('clean ends', 0)} | {c.get('settings checked', 0)} | "
                f"{c.get('targets intact', 0)} |")
    th = (res.get("thp") or {}).get("runs") or {}
    if th:
        med = {k: _median([r.get("passes_per_cpu_s", r["passes_per_s"]) for r in v])
               for k, v in th.items()}
        lines += ["", f"THP under wp (a 256 MiB writer, {res['thp']['seconds']:.0f} s runs, "
                  f"{len(next(iter(th.values())))} each; median passes per CPU-second of the "
                  "target's own time, user + system, so the other jobs on the machine do not "
                  "count; THP KiB of the target at start -> 1 s before its end):", "",
                  "| memory | alone | under wp | ratio | THP alone | THP under wp |",
                  "|---|---|---|---|---|---|"]
        for kind in ("thp", "4k"):
            a, w = med[f"{kind}-alone"], med[f"{kind}-wp"]
            ta, tw = (_readable(th[f"{kind}-{how}"]) for how in ("alone", "wp"))
            lines.append(f"| {'THP (MADV_HUGEPAGE)' if kind == 'thp' else '4 KiB pages'} | "
                         f"{a:.2f} | {w:.2f} | {w / a:.3f} | {ta['thp_kib_start']} -> "
                         f"{ta['thp_kib_end']} | {tw['thp_kib_start']} -> {tw['thp_kib_end']} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--only", choices=["fuzz", "cycles", "thp"], action="append")
    a = ap.parse_args()
    parts = {"fuzz": run_fuzz, "cycles": run_cycles, "thp": run_thp}
    if os.geteuid() != 0:
        raise SystemExit("bench_campaign: needs root (the live primitives)")
    res = {"quick": a.quick, **{k: fn(a.quick, print) for k, fn in parts.items()
                                if not a.only or k in a.only}}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print("\n".join(markdown(res)))
    return 1 if any((res.get(k) or {}).get("failed") for k in ("fuzz", "cycles")) else 0


if __name__ == "__main__":
    sys.exit(main())
