"""Run the whole benchmark suite and write docs/benchmarks.md and docs/benchmarks.json.

    .venv/bin/python bench/run_all.py [--quick] [--out-dir docs]      (as root)

Sections (each also runs on its own, see the bench_*.py files):
1. target slowdown per live primitive (and kernel DAMON) vs unmonitored;
2. monitor CPU time and peak RSS vs touched memory and thread count;
3. accuracy against ground truth (hot/cold, CPU/thread/write attribution, WSS);
4. kernel DAMON (paddr, sysfs) on the same workload;
5. intake and filter throughput (bench/bench_intake.py), and the wp primitive's
   own overhead benchmark (bench/bench_wp_overhead.py) when it is present;
6. the report channel: reports/s from 1 and 4 other processes into a live session,
   drops counted exactly, the session's CPU per report (bench/bench_channel.py);
7. the dirty rate against QEMU's calc-dirty-rate and the truth inside three TCG VMs,
   and its cost on the target (bench/bench_dirty.py; boots VMs);
8. the KSM advisor against the real KSM (bench/bench_ksm.py; changes KSM's settings
   for the run and restores them, waits while other processes offer memory to KSM);
9. the reliability campaign (bench/bench_campaign.py: fuzzing, attach/detach cycles
   with SIGKILLs, stress targets, THP under wp), about 1 h, so not in the default run:
   ``--only campaign --update`` merges it into the existing results.
Plus a cProfile of udamon recording the pinned workload (full run only).
The full run takes about 8-10 minutes on a 2-vCPU machine, --quick under 2.
Needs root (the live primitives do); exits 1 with one line otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_accuracy
import bench_campaign
import bench_hint_cost
import bench_loop
import bench_scale
import bench_slowdown
from common import ROOT, build, load1, start_json_workload

MODES = {
    "full": {"slowdown": {"repeat": 8, "duration": 5.0,
                          "workloads": ("access_pattern", "write", "stress-ng")},
             "scale": {"repeat": 3, "duration": 5.0, "sizes": (64, 512, 2048, 8192),
                       "threads": (1, 2, 8, 32)},
             "accuracy": {"repeat": 3, "duration": 10.0},
             "intake": ["--reports", "2000000", "--repeat", "5"],
             "wp_overhead": ["--cli", "--runs", "8", "--duration", "8"],
             "channel": ["--reports", "4000000", "--seconds", "2", "--repeat", "5"],
             "loop": {"regions": (10, 20, 50, 100, 200, 500, 1000), "turns": 600},
             "hint_cost": {"rates": (0, 10_000, 100_000), "window": 20.0},
             "profile_s": 8, "guest": True, "dirty": {"runs": 3}, "ksm": {"runs": 3}},
    "quick": {"slowdown": {"repeat": 3, "duration": 2.0,
                           "workloads": ("access_pattern", "write", "stress-ng")},
              "scale": {"repeat": 1, "duration": 3.0, "sizes": (64, 1024), "threads": (1, 8)},
              "accuracy": {"repeat": 1, "duration": 6.0},
              "intake": ["--reports", "300000", "--repeat", "3"],
              "wp_overhead": ["--cli", "--runs", "2", "--duration", "3"],
              "channel": ["--reports", "2000000", "--seconds", "1", "--repeat", "2"],
              "loop": {"regions": (10, 100, 1000), "turns": 200},
              "hint_cost": {"rates": (0, 100_000), "window": 6.0},
              "profile_s": 0, "guest": False, "dirty": {"runs": 1}, "ksm": {"runs": 1}},
}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine_facts() -> dict:
    def first(path, pat):
        try:
            with open(path) as f:
                m = re.search(pat, f.read(), re.M)
            return m.group(1).strip() if m else "?"
        except OSError:
            return "?"

    nodes = len([d for d in os.listdir("/sys/devices/system/node")
                 if re.fullmatch(r"node\d+", d)]) if os.path.isdir(
                     "/sys/devices/system/node") else 1
    pmu = os.path.exists("/sys/bus/event_source/devices/cpu/events/cpu-cycles") or \
        os.path.exists("/sys/bus/event_source/devices/cpu_core")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip() != ""
    except OSError:
        commit, dirty = "?", False
    return {"kernel": platform.release(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpu_model": first("/proc/cpuinfo", r"^model name\s*:(.*)$"),
            "mem_total": first("/proc/meminfo", r"^MemTotal:\s*(.*)$"), "numa_nodes": nodes,
            "hardware_pmu": pmu, "python": platform.python_version(),
            "git": commit + ("+dirty" if dirty else "")}


def run_intake(args: list[str], log) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_intake.py"), *args,
                        "--json", path], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    with open(path) as f:
        rows = json.load(f)
    os.unlink(path)
    log("  intake: " + "; ".join(f"{row['what']}" for row in rows[:1]) + " ...")
    return {"args": args, "rows": rows, "table": r.stdout.strip()}


def run_channel(args: list[str], log) -> dict:
    """bench_channel.py: the report channel's throughput and loss accounting."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_channel.py"), *args,
                        "--json", path], capture_output=True, text=True, timeout=1800)
    if r.returncode not in (0, 1) or not os.path.getsize(path):
        os.unlink(path)
        return {"skipped": (r.stderr.strip().splitlines() or ["?"])[-1]}
    with open(path) as f:
        out = json.load(f)
    os.unlink(path)
    for line in r.stderr.strip().splitlines():
        log(line)
    return out


def run_wp_overhead(args: list[str], log) -> dict:
    """bench_wp_overhead.py for wp, and with --cli also for hint (--primitive hint)."""
    script = ROOT / "bench" / "bench_wp_overhead.py"
    if not script.exists():
        return {"skipped": "bench/bench_wp_overhead.py not present"}

    def one(extra: list[str], label: str) -> dict:
        r = subprocess.run([sys.executable, str(script), *args, *extra], capture_output=True,
                           text=True, timeout=900)
        out = r.stdout.strip()
        if r.returncode != 0:
            return {"skipped": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
        m = re.search(r"ratio monitored/unmonitored:\s*([0-9.]+)", out)
        summary = [ln for ln in out.splitlines() if not ln.startswith("run ")]
        log(f"  {label} overhead: " + (summary[-1] if summary else "?"))
        return {"args": args + extra, "ratio": float(m.group(1)) if m else None,
                "summary": summary}

    res = one([], "wp")
    if "--cli" in args:
        res["hint"] = one(["--primitive", "hint"], "hint")
    return res


# cProfile with a CPU-time clock (time spent waiting does not count), enabled only
# inside the monitoring loop (run_live): start-up (imports, attach) is measured apart,
# as the process's whole CPU time, so the table shows what costs at steady state.
PROFILER = """
import cProfile, resource, sys, time
import udamon
out, prim, pid, seconds, rec = sys.argv[1:6]
session = udamon.Session(pids=[int(pid)], primitive=prim,
                         duration_ns=int(float(seconds) * 1e9))
session.start()  # attaching and start-up stay outside the profile
sink = udamon.RecordSink(rec, quiet=True)
sink.begin(session.header, session.monitor)
pr = cProfile.Profile(time.process_time)
pr.enable()
try:
    for snap in session:
        sink.snapshot(snap)
finally:
    pr.disable()
    sink.end(session.result, session.monitor, session.notes)
    pr.dump_stats(out)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open(out + ".cpu", "w") as f:
        f.write(str(ru.ru_utime + ru.ru_stime))
"""


def run_profile(seconds: float, log, primitives=("hint", "wp")) -> dict:
    """CPU-time profile of a ``udamon.Session`` with primitive P recording the pinned
    workload (what 'udamon record --primitive P' runs), the steady-state monitoring
    loop only: the session is started before the profiler is."""
    import pstats

    runs = {}
    for prim in primitives:
        wl, _ = start_json_workload([build("access_pattern"), "--size", "64",
                                     "--duration", str(seconds + 30)])
        tmp = tempfile.mkdtemp(prefix="udamon-prof-")
        prof, rec = os.path.join(tmp, "prof.out"), os.path.join(tmp, "rec.jsonl")
        try:
            r = subprocess.run([sys.executable, "-c", PROFILER, prof, prim, str(wl.pid),
                                str(seconds), rec], capture_output=True, text=True,
                               timeout=seconds + 120)
        finally:
            wl.terminate()
            wl.wait(30)
        if r.returncode != 0 or not os.path.exists(prof):
            runs[prim] = {"skipped": (r.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        st = pstats.Stats(prof)
        loop = st.total_tt
        with open(prof + ".cpu") as f:
            whole = float(f.read())
        rows = []
        for (fn, line, name), (_cc, nc, tt, ct, _callers) in sorted(
                st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]:
            short = fn.split("/src/")[-1] if "/src/" in fn else os.path.basename(fn)
            rows.append({"function": f"{short}:{line}({name})", "calls": nc, "tottime_s": tt,
                         "cumtime_s": ct})
        subprocess.run(["rm", "-rf", tmp])
        log(f"  profile {prim}: {loop:.2f} s CPU in the loop, {whole:.2f} s in all, "
            f"over {seconds:g} s")
        runs[prim] = {"loop_s": loop, "whole_s": whole, "top_tottime": rows}
    return {"seconds": seconds, "runs": runs}


GUEST_SHELL = ("cd {root} && {py} bench/bench_accuracy.py --repeat 2 --duration 30 "
               "--primitives rwp,hint --json /udamon-results/acc.json && "
               "{py} bench/bench_slowdown.py --primitives hint,rwp "
               "--workloads access_pattern --size 4 --repeat 3 --duration 8 "
               "--json /udamon-results/sd.json")


def run_guest(log) -> dict:
    """udamon rwp (which needs Linux 7.3) and hint next to kernel DAMON paddr and vaddr
    inside the QEMU guest of tests/guest/run.py (Linux 7.3), for hosts whose kernel lacks
    RWP or whose DAMON cannot be used."""
    import shutil

    runner = ROOT / "tests" / "guest" / "run.py"
    if not runner.exists():
        return {"skipped": "tests/guest/run.py not present"}
    if not shutil.which("qemu-system-x86_64"):
        return {"skipped": "qemu-system-x86_64 not installed (tests/guest/run.py --install)"}
    res_dir = Path(tempfile.mkdtemp(prefix="udamon-bench-guest-"))
    py = ROOT / ".venv" / "bin" / "python"
    shell = GUEST_SHELL.format(root=ROOT, py=py if py.exists() else sys.executable)
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(runner), "--quiet", "--results", str(res_dir),
                        "--timeout", "1700", "--shell", shell], capture_output=True, text=True,
                       timeout=1800)
    out = {"wall_s": time.monotonic() - t, "command": shell}
    try:
        out["accuracy"] = json.loads((res_dir / "acc.json").read_text())
        out["slowdown"] = json.loads((res_dir / "sd.json").read_text())
        out["kernel"] = (res_dir / "guest.log").read_text().split("guest: ", 1)[-1] \
            .splitlines()[0] if (res_dir / "guest.log").exists() else "?"
    except (OSError, json.JSONDecodeError):
        last = (r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or ["?"])[-1]
        log(f"  guest run failed; its log is kept in {res_dir}/guest.log")
        return {"skipped": f"guest run failed: {last}"}
    subprocess.run(["rm", "-rf", str(res_dir)])
    acc = out["accuracy"]
    log(f"  guest: kernel DAMON paddr classes {acc['runs_kernel'][0].get('classes')}; vaddr "
        f"{(acc.get('runs_kernel_vaddr') or [{}])[0].get('classes')}; udamon "
        + "; ".join(f"{r.get('primitive')} {r.get('classes')}"
                    for r in acc.get("runs_udamon") or []))
    return out


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def goals_table(res: dict) -> list[str]:
    """The performance goals (the issue 'DAMON's default intervals at a kernel-like cost
    per sample'), each with the number this run measured and met/missed."""
    rows: list[tuple[str, str, str, bool | None]] = []
    loop = res.get("loop", {})
    fc = loop.get("fit_c")
    if fc:
        rows.append(("wp loop (C): udamon CPU per armed page", "<= 2 us",
                     f"{fc['us_per_armed_page']:.2f} us", fc["us_per_armed_page"] <= 2))
    fl = loop.get("floor")
    if fl:
        e = fl["empty_turn"]["cpu_us_per_turn"]
        rows.append(("wp loop (C): fixed CPU per turn (a turn with no region, measured)",
                     "<= 30 us", f"{e:.1f} us", e <= 30))
    if fc:
        # over 10..1000 regions the cost is not a line (late turns, a CPU-bound loop at
        # >= 500 regions): the intercept says little about a turn with few regions
        rows.append(("wp loop (C): fixed CPU per turn (least-squares intercept, 10..1000 "
                     "regions)", "<= 30 us", f"{fc['fixed_us_per_turn']:.1f} us",
                     fc["fixed_us_per_turn"] <= 30))
    if fl:
        rows.append(("floor, no goal: a bare C ppoll(5 ms) loop, CPU per wake-up "
                     "(bench/workloads/sleeper.c)", "–",
                     f"{fl['sleeper']['cpu_us_per_turn']:.0f} us", None))
        rows.append(("floor, no goal: wp loop (C) per armed page with the target stopped "
                     "(no TLB-flush IPI)", "–", f"{fl['stopped_us_per_page']:.2f} us", None))
        if "buffer_R_us_per_page" in fl:
            r, w = fl["buffer_R_us_per_page"], fl["buffer_W_us_per_page"]
            rows.append(("wp loop (C): per armed page in memory the target does not write "
                         "(target running)", "<= 2 us", f"{r:.2f} us", r <= 2))
            rows.append(("wp loop (C): per armed page in memory the target writes all the "
                         "time (a TLB-flush IPI each)", "<= 2 us", f"{w:.2f} us", w <= 2))
    big = [r for r in loop.get("rows", []) if r["native"] and r["regions"] == max(
        x["regions"] for x in loop["rows"])] if loop.get("rows") else []
    if big:
        r = big[0]
        rows.append((f"wp loop (C): turns run at {r['regions']} regions (late ones)",
                     "all, on time", f"{r['turns_per_s']:.0f}/s of {r['due_per_s']:.0f} due "
                     f"({r['late']} of {r['turns']} late)", r["late"] == 0))
    cli = loop.get("cli")
    if cli:
        rows.append((f"whole wp session, ~{cli['mean_regions']:.0f} regions (--regions "
                     f"{cli['regions_opt']}), steady", "<= 1.5% of one CPU",
                     f"{cli['cpu_pct']:.2f}%", cli["cpu_pct"] <= 1.5))
    hc = {r["rate"]: r for r in res.get("hint_cost", {}).get("rows", [])}
    if 0 in hc:
        rows.append(("hint, no faults, steady", "<= 0.3% of one CPU",
                     f"{hc[0]['cpu_pct']:.2f}%", hc[0]["cpu_pct"] <= 0.3))
    hot = hc.get(100_000)
    if hot and "us_per_fault" in hot:
        rows.append(("hint at 100k faults/s: udamon CPU per fault; lost samples",
                     "<= 0.5 us; 0", f"{hot['us_per_fault']:.2f} us; {hot['lost_samples']}",
                     hot["us_per_fault"] <= 0.5 and hot["lost_samples"] == 0))
    sd = res.get("slowdown", {}).get("workloads", {})
    for wl in ("access_pattern", "write"):
        for prim in ("hint", "wp"):
            row = sd.get(wl, {}).get("conditions", {}).get(prim)
            if row:
                rows.append((f"target slowdown, {prim} at its defaults, {wl} (median ratio)",
                             ">= 0.99", f"{row['ratio']:.3f}", row["ratio"] >= 0.99))
    g = res.get("guest", {})
    for wl, r in (g.get("slowdown", {}).get("workloads", {}) or {}).items():
        row = r.get("conditions", {}).get("rwp")
        if row:
            rows.append((f"target slowdown, rwp at its defaults, {wl} (guest, TCG)", ">= 0.99",
                         f"{row['ratio']:.3f}", row["ratio"] >= 0.99))
    for row in res.get("intake", {}).get("rows", []):
        if row["what"].endswith(", 2 probes"):
            import statistics

            m = statistics.median(row["rates"])
            rows.append(("intake: filters + counting + 2 probes + written pages, one core",
                         ">= 5 M reports/s", f"{m / 1e6:.2f} M/s", m >= 5e6))
    hwm = [r["hwm_mib"]["median"] for r in res.get("scale", {}).get("rows", [])
           if r["hwm_mib"].get("n")]
    if hwm:
        rows.append(("peak RSS, 64 MiB .. 8 GiB targets and 1..32 threads (scale section)",
                     "<= 64 MiB", f"{max(hwm):.0f} MiB", max(hwm) <= 64))
    if cli:
        rows.append(("peak RSS of the wp session above", "<= 64 MiB",
                     f"{cli['peak_rss_mib']:.0f} MiB", cli["peak_rss_mib"] <= 64))
    if not rows:
        return []
    return (["## Goals: DAMON's default intervals at a kernel-like cost", "",
             "| what | goal | this run | |", "|---|---|---|---|"]
            + [f"| {a} | {b} | {c} | {_met(d)} |" for a, b, c, d in rows] + [""])


def write_markdown(res: dict, path: Path, png: str | None) -> None:
    m = res["machine"]
    out = ["# udamon benchmarks", "",
           "Generated by `bench/run_all.py`; do not edit by hand (the analysis comes from "
           "`bench/analysis.md`).", "",
           f"- date: {res['date']}; mode: {res['mode']}; wall time of the last invocation "
           f"{res['wall_s'] / 60:.1f} min",
           f"- command: `{res['command']}`",
           f"- machine: Linux {m['kernel']} {m['machine']}, {m['cpus']} vCPUs "
           f"({m['cpu_model']}), {m['mem_total']} RAM, {m['numa_nodes']} NUMA node(s), "
           f"hardware PMU: {'yes' if m['hardware_pmu'] else 'no'}; Python {m['python']}; "
           f"git {m['git']}",
           "- 1-min load average before/after each section: " + "; ".join(
               f"{k} {v['load_start']:.1f}/{v['load_end']:.1f} ({v['date'][11:16]})"
               for k, v in res["sections"].items())
           + (" — **other jobs were running (load >= 0.5): numbers are preliminary "
              "(noisy)**" if res["noisy"] else ""),
           ""]
    out += goals_table(res)
    analysis = ROOT / "bench" / "analysis.md"
    if analysis.exists():
        out += [analysis.read_text().strip(), ""]
    out += ["## 1. Target slowdown (goal: at most 1%)", ""]
    out += bench_slowdown.markdown(res["slowdown"]) + [""]
    wp = res.get("wp_overhead", {})
    if wp:
        how = ("'udamon record --primitive wp --pid' at its defaults on the single-writer "
               "workload; work per CPU-second is the workload's passes per second of its own "
               "CPU time" if "--cli" in wp.get("args", []) else "driving WpPrimitive directly")
        out += ["wp primitive's own benchmark (`bench/bench_wp_overhead.py "
                f"{' '.join(wp.get('args', []))}`, {how}):", ""]
        out += (["    " + ln for ln in wp["summary"]] if "summary" in wp
                else [f"skipped: {wp['skipped']}"]) + [""]
        hint = wp.get("hint")
        if hint:
            out += ["The same for hint (`bench/bench_wp_overhead.py "
                    f"{' '.join(hint.get('args', []))}`; the workload's own CPU time then "
                    "includes its hinting faults):", ""]
            out += (["    " + ln for ln in hint["summary"]] if "summary" in hint
                    else [f"skipped: {hint['skipped']}"]) + [""]
    out += ["## 2. Monitor cost and scale", ""]
    out += bench_scale.markdown(res["scale"]) + [""]
    if "loop" in res:
        out += ["### The controlled sampling loop (bench/bench_loop.py)", "",
                bench_loop.__doc__.split("\n\n", 2)[2].strip(), ""]
        out += bench_loop.markdown(res["loop"]) + [""]
    if "hint_cost" in res:
        out += ["### hint: idle cost and cost per fault (bench/bench_hint_cost.py)", "",
                bench_hint_cost.__doc__.split("\n\n", 2)[2].strip(), ""]
        out += bench_hint_cost.markdown(res["hint_cost"]) + [""]
    if png:
        out += [f"![udamon CPU and RSS vs memory and threads]({png})", ""]
    out += ["## 3. Accuracy against ground truth (pinned workload)", "",
            bench_accuracy.__doc__.split("\n\n", 2)[2].strip(), ""]
    out += bench_accuracy.markdown(res["accuracy"]) + [""]
    out += ["## 4. Kernel DAMON on the same workload", ""]
    k = res["accuracy"]["kernel"]
    g = res.get("guest")
    if "skipped" not in k:
        out += ["Detection: see the kernel DAMON column of section 3; overhead: the kernel "
                "DAMON rows of section 1.", ""]
    else:
        out += [f"On this host: {k['skipped']}.", ""]
    if g and "skipped" not in g and "udamon" in g["accuracy"]:
        out += [f"Measured inside the QEMU guest of `tests/guest/run.py` ({g['kernel']}; TCG "
                "emulation, ~20x slower than the host, so absolute numbers do not compare with "
                "the host's), side by side on the same workload in one run: udamon rwp and "
                "hint (the guest lets the settings guard write the hint scan tunables), "
                "kernel DAMON paddr (the buffers' physical ranges) and kernel DAMON vaddr "
                "(the workload process). Guest command: "
                f"`{g['command']}`.", ""]
        out += bench_accuracy.markdown(g["accuracy"]) + [""]
        out += ["Overhead in the guest (access_pattern with 4 MiB buffers; single-threaded "
                "TCG: the two emulated CPUs, the workload and udamon's Python share one host "
                "thread):", ""]
        out += bench_slowdown.markdown(g["slowdown"])[2:] + [""]
    elif g and "skipped" not in g:
        ka, ks = g["accuracy"]["kernel"], g["slowdown"]
        out += [f"Measured instead inside the QEMU guest of `tests/guest/run.py` ({g['kernel']}; "
                "TCG emulation, ~20x slower than the host, so absolute numbers do not compare "
                "with the host's; the guest is too slow for udamon's Python to keep up, so "
                "udamon's side is the host's, section 3). Guest command: "
                f"`{g['command']}`.", ""]
        if "skipped" in ka:
            out += [f"kernel DAMON in the guest: {ka['skipped']}", ""]
        else:
            c = ka["correct_of_4"]
            out += ["| buffer | truth | kernel DAMON paddr: mean nr_accesses per page "
                    "(per-page region lookup) | class |", "|---|---|---|---|"]
            last = g["accuracy"]["runs_kernel"][-1]["classes"]
            for b in "RWSI":
                s = ka["scores"][b]
                out.append(f"| {b} | {'hot' if b in 'RWS' else 'cold'} | {s['median']:.2f} "
                           f"({s['min']:.2f}..{s['max']:.2f}) | {last[b]} |")
            hu = res["accuracy"]["udamon"]
            hu = hu.get("hint", hu)
            out += ["", f"Kernel DAMON: {c['median']:.0f}/4 buffers right; udamon hint "
                    f"(host, section 3): {hu['correct_of_4']['median']:.0f}"
                    f"/4 by region nr_accesses, "
                    f"{hu['probe_correct_of_4']['median']:.0f}/4 by "
                    "exact per-buffer hits.", ""]
        out += ["Kernel DAMON overhead in the guest (access_pattern with 4 MiB buffers):", ""]
        out += bench_slowdown.markdown(ks)[2:] + [""]
    elif g:
        out += [f"Guest run: {g['skipped']}", ""]
    out += ["## 5. Intake and filters (`bench/bench_intake.py "
            f"{' '.join(res['intake'].get('args', []))}`)", ""]
    out += [res["intake"].get("table", "error: " + res["intake"].get("error", "?")), ""]
    ch = res.get("channel")
    if ch:
        import bench_channel

        out += ["## 6. Report channel (external primitive)", ""]
        out += (bench_channel.markdown(ch["rows"], ch["args"]) if "rows" in ch
                else [f"skipped: {ch['skipped']}"]) + [""]
    if res.get("dirty"):
        import bench_dirty

        out += ["## 7. Dirty rate: udamon dirty-rate, QEMU's calc-dirty-rate, the guests' truth",
                ""] + bench_dirty.markdown(res["dirty"])
    if res.get("ksm"):
        import bench_ksm

        out += ["## 8. KSM advisor: udamon ksm-advise against the real KSM", ""]
        out += bench_ksm.markdown(res["ksm"])
    if res.get("campaign"):
        out += bench_campaign.markdown(res["campaign"]) + [""]
    prof = res.get("profile")
    for prim, pr in (prof or {}).get("runs", {}).items():
        if "top_tottime" not in pr:
            out += [f"## Profile: udamon record --primitive {prim}", "",
                    f"not run: {pr.get('skipped')}", ""]
            continue
        secs = prof["seconds"]
        out += [f"## Profile: udamon record --primitive {prim}, {secs:g} s, steady state "
                "(cProfile with a CPU-time clock inside the monitoring loop, by own time)", "",
                f"{pr['whole_s']:.2f} s of CPU in all, of which {pr['loop_s']:.2f} s in the "
                f"monitoring loop ({100 * pr['loop_s'] / secs:.1f}% of one CPU; the rest is "
                "start-up: imports, attach, and for wp the injection).", "",
                "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
        out += [f"| `{r['function']}` | {r['calls']:,} | {r['tottime_s']:.3f} | "
                f"{r['cumtime_s']:.3f} |" for r in pr["top_tottime"]]
        out.append("")
    path.write_text("\n".join(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short settings (under ~2 minutes)")
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    ap.add_argument("--update", action="store_true",
                    help="with --only: rerun those sections and merge them into the existing "
                         "results (e.g. to redo a section measured while the machine was busy)")
    ap.add_argument("--only",
                    default="slowdown,scale,loop,hint_cost,accuracy,guest,intake,wp_overhead,"
                            "channel,profile,dirty,ksm",
                    help="comma-separated sections to run (default: all but campaign, "
                         "the reliability campaign of bench/bench_campaign.py, about 1 h: "
                         "'--only campaign --update' adds it)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/run_all.py: needs root (the live primitives change kernel settings "
              "and read other processes' page tables)", file=sys.stderr)
        return 1
    mode = "quick" if a.quick else "full"
    cfg = MODES[mode]
    only = set(a.only.split(","))

    def log(s):
        print(s, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    out = Path(a.out_dir)
    res = {}
    if a.update and (out / "benchmarks.json").exists():
        res = json.loads((out / "benchmarks.json").read_text())
        if res.get("mode") != mode:
            print(f"--update: {out / 'benchmarks.json'} is a {res.get('mode')} run, this is "
                  f"{mode}", file=sys.stderr)
            return 2
    res.update({"date": now(), "mode": mode, "command": ".venv/bin/python bench/run_all.py"
                + (" --quick" if a.quick else ""), "machine": machine_facts(),
                "load_start": load1()})
    sections = res.setdefault("sections", {})

    def section(name, title, fn, *args, **kw):
        log(title)
        t, l0 = time.monotonic(), load1()
        res[name] = fn(*args, **kw)
        sections[name] = {"date": now(), "load_start": l0, "load_end": load1(),
                          "wall_s": time.monotonic() - t}

    if "slowdown" in only:
        section("slowdown", "1. slowdown", bench_slowdown.run, log=log, **cfg["slowdown"])
    if "scale" in only:
        section("scale", "2. monitor cost and scale", bench_scale.run, log=log,
                **cfg["scale"])
    if "accuracy" in only:
        section("accuracy", "3+4. accuracy, udamon hint and kernel DAMON", bench_accuracy.run,
                log=log, **cfg["accuracy"])
    if "loop" in only:
        section("loop", "2b. the controlled sampling loop (bench_loop.py)", bench_loop.run,
                "wp", cfg["loop"]["regions"], cfg["loop"]["turns"], log=log)
    if "hint_cost" in only:
        section("hint_cost", "2c. hint idle and per-fault cost (bench_hint_cost.py)",
                bench_hint_cost.run, cfg["hint_cost"]["rates"], cfg["hint_cost"]["window"],
                log=log)
    if "intake" in only:
        section("intake", "5. intake", run_intake, cfg["intake"], log)
    if "wp_overhead" in only:
        section("wp_overhead", "wp and hint overhead (bench_wp_overhead.py)", run_wp_overhead,
                cfg["wp_overhead"], log)
    if "channel" in only:
        section("channel", "6. report channel (bench_channel.py)", run_channel,
                cfg["channel"], log)
    if "guest" in only and cfg["guest"] and "skipped" in res.get("accuracy", {}).get(
            "kernel", {"skipped": 1}):
        section("guest", "4b. kernel DAMON in a QEMU guest (host kdamonds unusable)",
                run_guest, log)
    if "dirty" in only:
        import bench_dirty

        section("dirty", "7. dirty rate vs QEMU (bench_dirty.py)", bench_dirty.run,
                cfg["dirty"]["runs"], log)
    if "ksm" in only:
        import bench_ksm

        section("ksm", "8. KSM advisor vs KSM (bench_ksm.py)", bench_ksm.run, cfg["ksm"]["runs"],
                log)
    if "campaign" in only:
        section("campaign", "9. reliability campaign (bench_campaign.py)", bench_campaign.run,
                a.quick, log)
    if "profile" in only and cfg["profile_s"]:
        section("profile", "profile", run_profile, cfg["profile_s"], log)
    res["load_end"] = load1()
    res["noisy"] = any(max(v["load_start"], v["load_end"]) >= 0.5 for v in sections.values())
    res["wall_s"] = time.monotonic() - t0
    out.mkdir(parents=True, exist_ok=True)
    if {"slowdown", "scale", "accuracy", "intake"} <= res.keys():
        png = "benchmarks-scale.png" if (out / "benchmarks-scale.png").exists() else None
        if "scale" in only and bench_scale.plot(res["scale"], str(out / "benchmarks-scale.png")):
            png = "benchmarks-scale.png"
        (out / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str))
        write_markdown(res, out / "benchmarks.md", png)
        log(f"wrote {out / 'benchmarks.md'} and benchmarks.json ({res['wall_s']:.0f} s)")
    else:
        (out / "benchmarks-partial.json").write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {out / 'benchmarks-partial.json'} only (--only without --update)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
