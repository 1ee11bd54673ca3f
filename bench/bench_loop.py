"""Cost of the controlled sampling loop (wp, rwp) per turn and per armed page, 10 to 1000 regions.

    sudo .venv/bin/python bench/bench_loop.py [--mode wp] [--regions 10,20,50,100,200,500,1000]
                                              [--turns 400] [--json FILE]

A target (tests/workloads/access_pattern, 4 x 64 MiB, its reader and writer
pinned to CPUs 0 and 1) is attached by the primitive; for each region count N
the address space of the four buffers is cut into N equal regions and
``run_window`` runs windows of 20 turns at DAMON's 5 ms sampling interval, with
the C loop and with the pure-Python fallback, one after the other.  Measured
per implementation and N: the monitoring thread's CPU time (user + system,
RUSAGE_THREAD; the loop runs in the calling thread and sleeps in ppoll/poll)
per turn, the turns run versus due in the wall time taken, and the turns that
started late.  A least-squares line over N gives the fixed cost per turn
(intercept) and the cost per armed page (slope).  Only the loop is measured:
the primitive's per-aggregation Python (fault join, reports) and the core are
in bench_scale / the steady-state profiles.  Beside the loop, its floors: a bare C
process sleeping in ppoll at the same period (bench/workloads/sleeper.c), a turn with
no region, and the loop with the target SIGSTOPped (no TLB-flush IPIs; SIGCONT on every
path).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
from common import build, start_json_workload

from udamon.primitives import uffd_loop
from udamon.primitives.uffd import RwpPrimitive, WpPrimitive, uffd_available
from udamon.primitives.uffd_abi import MODES, SCAN_JOIN
from udamon.primitives.uffd_loop import WindowStats, WindowTarget

SAMPLE_NS = 5_000_000
TURNS_PER_WINDOW = 20


def _thread_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def _plan(lo: int, hi: int, n: int, turns: int, rng) -> np.ndarray:
    edges = np.linspace(lo, hi, n + 1).astype(np.uint64) & ~np.uint64(4095)
    sz = (edges[1:] - edges[:-1]).astype(np.float64)
    off = (rng.random((turns, n)) * sz).astype(np.uint64)
    return (edges[:-1] + off) & ~np.uint64(4095)


def measure(prim, pid: int, lo: int, hi: int, n: int, turns: int, native: bool,
            join: int = SCAN_JOIN, rt: int = 0) -> dict:
    t = prim._targets[pid]
    rng = np.random.default_rng(n)
    stats = WindowStats()
    done = 0
    cpu0, wall0 = _thread_cpu(), time.monotonic()
    while done < turns:
        k = min(TURNS_PER_WINDOW, turns - done)
        wt = WindowTarget(t.uffd, t.pagemap, t.pidfd, _plan(lo, hi, n, k, rng), t.starts,
                          t.ends)
        arm, scan = np.zeros(k, np.int64), np.zeros(k, np.int64)
        args = ([wt], prim.mode, time.monotonic_ns(), SAMPLE_NS, 0, -1, arm, scan, stats)
        nxt, _ = (uffd_loop.run_window(*args, join=join, rt_priority=rt) if native
                  else uffd_loop.run_window_py(*args))
        done += nxt
    cpu, wall = _thread_cpu() - cpu0, time.monotonic() - wall0
    return {"regions": n, "native": native, "join": join, "rt": rt, "turns": stats.turns,
            "late": stats.late,
            "wall_s": wall, "cpu_s": cpu, "cpu_us_per_turn": cpu / stats.turns * 1e6,
            "cpu_pct": cpu / wall * 100, "turns_per_s": stats.turns / wall,
            "due_per_s": 1e9 / SAMPLE_NS}


def cli_steady(mode: str, regions: str = "10,20", window: float = 20.0) -> dict:
    """The whole of ``udamon record --primitive MODE --regions 10,20`` at its defaults on
    the same target: steady CPU (utime + stime over ``window`` s after a 3 s warm-up, so
    start-up is left out), snapshots per second and the peak RSS."""
    import subprocess
    import tempfile

    from common import CLK_TCK, UDAMON

    wl, info = start_json_workload([build("access_pattern"), "--size", "64",
                                    "--duration", "3600"])
    fd, rec = tempfile.mkstemp(prefix="udamon-bench-", suffix=".jsonl")
    os.close(fd)

    def ticks(pid):
        with open(f"/proc/{pid}/stat") as f:
            x = f.read().rsplit(")", 1)[1].split()
        return int(x[11]) + int(x[12])

    try:
        mon = subprocess.Popen([*UDAMON, "record", "--primitive", mode, "-q", "--pid",
                                str(wl.pid), "--regions", regions, "--duration",
                                f"{window + 4}s", "-o", rec], stderr=subprocess.PIPE,
                               text=True)
        time.sleep(3)
        c0, t0 = ticks(mon.pid), time.monotonic()
        time.sleep(window)
        c1, t1 = ticks(mon.pid), time.monotonic()
        with open(f"/proc/{mon.pid}/status") as f:
            hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        _, err = mon.communicate(timeout=120)
        with open(rec) as f:
            lines = [json.loads(x) for x in f if x.strip()]
    finally:
        wl.terminate()
        wl.wait(30)
        os.unlink(rec)
    snaps = [x for x in lines[1:] if "regions" in x]
    return {"mode": mode, "regions_opt": regions, "cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0)
            * 100, "snapshots_per_s": len(snaps) / (window + 4),
            "mean_regions": sum(len(x["regions"]) for x in snaps) / max(len(snaps), 1),
            "peak_rss_mib": hwm, "notes": lines[-1].get("end", {}).get("notes", [])}


ALT_JOIN = 2 << 20  # SCAN_JOIN before scan_cost's break-even (1 MiB), in the same run


def scan_cost(mode: str, reps: int = 1000) -> dict:
    """What one PAGEMAP_SCAN costs, per call and per page walked, and one protect ioctl:
    measured in this process on a populated, registered 64 MiB buffer, its pages left
    unprotected as the pages between a turn's armed pages are (they match the scan and
    are reported), and, for comparison, all protected (nothing matches).  The break-even
    of SCAN_JOIN is the gap whose walk costs as much as another call."""
    import ctypes
    import fcntl
    import mmap
    import struct

    from udamon.primitives import uffd_abi as abi

    m = MODES[mode]
    n = 16384
    buf = mmap.mmap(-1, n * 4096)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[::4096] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fd = abi.self_uffd()
    pm = os.open("/proc/self/pagemap", os.O_RDONLY)
    kib = [4, 256, 1024, 4096, 16384, 65536]
    try:
        abi.uffd_api(fd, m.required)
        fcntl.ioctl(fd, abi.UFFDIO_REGISTER,
                    bytearray(struct.pack("<QQQQ", addr, n * 4096, m.register, 0)))
        vec = (ctypes.c_uint64 * (3 * abi.VEC_LEN))()
        cat, anyof, ret = m.scan_masks

        def one(length: int) -> float:
            arg = abi.PmScanArg(size=96, vec=ctypes.addressof(vec), vec_len=abi.VEC_LEN,
                                category_mask=cat, category_anyof_mask=anyof,
                                return_mask=ret)
            t = time.perf_counter()
            for _ in range(reps):
                arg.start, arg.end = addr, addr + length
                abi.ioctl_ptr(pm, abi.PAGEMAP_SCAN, arg)
            return (time.perf_counter() - t) / reps * 1e6

        unprotected = [one(k << 10) for k in kib]
        fcntl.ioctl(fd, m.protect_cmd, bytearray(struct.pack("<QQQ", addr, n * 4096,
                                                             m.protect_flag)))
        protected = [one(k << 10) for k in kib]
        prot = bytearray(struct.pack("<QQQ", addr, 4096, m.protect_flag))
        t = time.perf_counter()
        for _ in range(reps):
            fcntl.ioctl(fd, m.protect_cmd, prot)
        protect_us = (time.perf_counter() - t) / reps * 1e6
    except OSError as e:
        return {"skipped": f"{mode}: {e}"}
    finally:
        os.close(pm)
        os.close(fd)
        del arr
        buf.close()
    pages = np.asarray(kib) / 4
    per_page_us, per_call_us = np.polyfit(pages, unprotected, 1)
    quiet_page_us, _ = np.polyfit(pages, protected, 1)
    return {"kib": kib, "us": unprotected, "us_protected": protected,
            "us_per_call": float(per_call_us), "ns_per_page": float(per_page_us * 1000),
            "ns_per_page_protected": float(quiet_page_us * 1000), "protect_us": protect_us,
            "break_even_mib": float(per_call_us / per_page_us * 4096 / 2**20),
            "scan_join_mib": SCAN_JOIN / 2**20}


ROUNDS = 4


def _combine(parts: list[dict]) -> dict:
    """One row of several measurements of the same variant."""
    r = dict(parts[0])
    for k in ("turns", "late", "wall_s", "cpu_s"):
        r[k] = sum(p[k] for p in parts)
    r["cpu_us_per_turn"] = r["cpu_s"] / max(r["turns"], 1) * 1e6
    r["cpu_pct"] = r["cpu_s"] / r["wall_s"] * 100
    r["turns_per_s"] = r["turns"] / r["wall_s"]
    return r


def fit(rows: list[dict]) -> dict:
    x = np.asarray([r["regions"] for r in rows], dtype=float)
    y = np.asarray([r["cpu_us_per_turn"] for r in rows], dtype=float)
    slope, icpt = np.polyfit(x, y, 1)
    return {"fixed_us_per_turn": float(icpt), "us_per_armed_page": float(slope)}


FLOOR_REGIONS = (10, 100)


def floor(prim, wl, lo: int, hi: int, turns: int, log=print, info: dict | None = None
          ) -> dict:
    """What no change to the loop can take away, measured beside it: a bare C process
    sleeping in ppoll at the same period (the kernel's sleep and wake-up), the C loop's
    turn with no region (its own fixed work), and the C loop with the target stopped
    (SIGSTOP: no thread of the target runs, so a protect needs no TLB-flush IPI to
    another CPU; the difference to the running target is that IPI)."""
    import signal
    import subprocess

    n = max(turns, 200)
    p = subprocess.run([build("sleeper"), str(n), str(SAMPLE_NS // 1000)], check=True,
                       capture_output=True, text=True, timeout=600)
    out: dict = {"sleeper": json.loads(p.stdout)}
    out["empty_turn"] = measure(prim, wl.pid, lo, hi, 0, n, True)
    out["running"] = [measure(prim, wl.pid, lo, hi, k, n, True) for k in FLOOR_REGIONS]
    if info:
        # the same, with every region in one buffer: R (only read: its pages stay
        # protected from the registration on, so arming one needs no flush) and W (written
        # all the time: every armed page was written since it was last protected)
        for b in "RW":
            out[f"buffer_{b}"] = [measure(prim, wl.pid, *info[b], k, n, True)
                                  for k in FLOOR_REGIONS]
    os.kill(wl.pid, signal.SIGSTOP)
    try:
        out["stopped"] = [measure(prim, wl.pid, lo, hi, k, n, True) for k in FLOOR_REGIONS]
    finally:
        os.kill(wl.pid, signal.SIGCONT)
    k0, k1 = FLOOR_REGIONS
    for key in ("running", "stopped", "buffer_R", "buffer_W"):
        if key not in out:
            continue
        a, b = out[key]
        out[f"{key}_us_per_page"] = (b["cpu_us_per_turn"] - a["cpu_us_per_turn"]) / (k1 - k0)
    log(f"  floor: a bare C ppoll({SAMPLE_NS // 1000} us) loop "
        f"{out['sleeper']['cpu_us_per_turn']:.0f} us CPU per turn; the C loop with no region "
        f"{out['empty_turn']['cpu_us_per_turn']:.0f}; per armed page "
        f"{out['running_us_per_page']:.2f} us with the target running, "
        f"{out['stopped_us_per_page']:.2f} stopped")
    if "buffer_R_us_per_page" in out:
        log(f"  per armed page, regions in one buffer: {out['buffer_R_us_per_page']:.2f} us in "
            f"the read-only R (no flush), {out['buffer_W_us_per_page']:.2f} us in the "
            "written W (a TLB-flush IPI each)")
    return out


def run(mode: str = "wp", regions=(10, 20, 50, 100, 200, 500, 1000), turns: int = 400,
        log=print) -> dict:
    ok, why = uffd_available(MODES[mode])
    if os.geteuid() != 0 or not ok:
        return {"skipped": why if os.geteuid() == 0 else "needs root"}
    wl, info = start_json_workload([build("access_pattern"), "--size", "64",
                                    "--duration", "3600"])
    cls = WpPrimitive if mode == "wp" else RwpPrimitive
    prim = cls([wl.pid], attribute=False)
    out: dict = {"mode": mode, "sample_ms": SAMPLE_NS / 1e6, "native_built": uffd_loop.native(),
                 "rows": []}
    try:
        prim.start([wl.pid])
        lo = min(info[b][0] for b in "RWSI")
        hi = max(info[b][1] for b in "RWSI")
        runs = ([(True, SCAN_JOIN, 0), (True, ALT_JOIN, 0), (True, SCAN_JOIN, 1),
                 (False, SCAN_JOIN, 0)] if uffd_loop.native() else [(False, SCAN_JOIN, 0)])
        for n in regions:
            # the variants take turns, ROUNDS times each and in a rotating order, so that
            # drift in the machine's load and the cost of coming first (after another
            # variant left the caches cold: 10-20% here) fall on all of them alike
            parts: dict[tuple, list[dict]] = {v: [] for v in runs}
            for i in range(ROUNDS):
                for v in runs[i % len(runs):] + runs[:i % len(runs)]:
                    parts[v].append(measure(prim, wl.pid, lo, hi, n,
                                            max(turns // ROUNDS, 1), *v))
            for (native, join, rt), ps in parts.items():
                r = _combine(ps)
                out["rows"].append(r)
                log(f"  loop {mode} {'C' if native else 'Python'} join {join >> 20} MiB "
                    f"{'SCHED_FIFO ' if rt else ''}"
                    f"{n} regions: {r['cpu_us_per_turn']:.0f} us CPU/turn "
                    f"({r['cpu_pct']:.1f}% of a CPU), "
                    f"{r['turns_per_s']:.0f}/{r['due_per_s']:.0f} turns/s, {r['late']} late")
        out["floor"] = floor(prim, wl, lo, hi, turns, log, info)
    finally:
        prim.stop()
        wl.terminate()
        wl.wait(30)
    for native in (True, False):
        rows = [r for r in out["rows"] if r["native"] == native and r["join"] == SCAN_JOIN
                and not r["rt"]]
        if len(rows) >= 2:
            out["fit_c" if native else "fit_python"] = fit(rows)
    out["scan_cost"] = scan_cost(mode)
    sc = out["scan_cost"]
    if "skipped" not in sc:
        log(f"  PAGEMAP_SCAN {sc['us_per_call']:.2f} us a call + {sc['ns_per_page']:.2f} ns a "
            f"page walked: joining pays up to {sc['break_even_mib']:.2f} MiB; protect "
            f"{sc['protect_us']:.2f} us a page (this process, no other CPU)")
    out["cli"] = cli_steady(mode)
    c = out["cli"]
    log(f"  udamon record --primitive {mode} --regions {c['regions_opt']}: "
        f"{c['cpu_pct']:.2f}% of a CPU steady, {c['mean_regions']:.0f} regions, "
        f"{c['snapshots_per_s']:.1f} snapshots/s, peak RSS {c['peak_rss_mib']:.0f} MiB")
    return out


def markdown(res: dict) -> list[str]:
    if "skipped" in res:
        return [f"skipped: {res['skipped']}"]
    out = [f"`{res['mode']}` at {res['sample_ms']:g} ms sampling, 4 x 64 MiB pinned "
           "reader/writer target; udamon's monitoring-thread CPU (user + system):", "",
           f"| regions | C: us CPU per turn | C: % of one CPU | C: turns/s (due) | C: late | "
           f"C, join {ALT_JOIN >> 20} MiB: us CPU per turn | C, SCHED_FIFO: turns/s (late) | "
           "Python: us CPU per turn | Python: % of one CPU | Python: turns/s | C vs Python |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["regions"], r["native"], r.get("join", SCAN_JOIN), r.get("rt", 0)): r
          for r in res["rows"]}
    for n in sorted({r["regions"] for r in res["rows"]}):
        c, p = by.get((n, True, SCAN_JOIN, 0)), by.get((n, False, SCAN_JOIN, 0))
        old, fifo = by.get((n, True, ALT_JOIN, 0)), by.get((n, True, SCAN_JOIN, 1))

        def cols(r):
            return (["–"] * 4 if r is None else
                    [f"{r['cpu_us_per_turn']:.0f}", f"{r['cpu_pct']:.1f}%",
                     f"{r['turns_per_s']:.0f} ({r['due_per_s']:.0f})", str(r["late"])])

        ratio = (f"{p['cpu_us_per_turn'] / c['cpu_us_per_turn']:.1f}x" if c and p else "–")
        rt = "–" if fifo is None else f"{fifo['turns_per_s']:.0f} ({fifo['late']})"
        out.append(f"| {n} | " + " | ".join(cols(c)) + " | " + cols(old)[0] + f" | {rt} | "
                   + " | ".join(cols(p)[:3]) + f" | {ratio} |")
    for key, name in (("fit_c", "C"), ("fit_python", "Python")):
        f = res.get(key)
        if f:
            out.append("")
            out.append(f"{name} loop, least squares over the rows: fixed cost "
                       f"{f['fixed_us_per_turn']:.1f} us per turn, "
                       f"{f['us_per_armed_page']:.2f} us per armed page.")
    sc = res.get("scan_cost")
    if sc and "skipped" not in sc:
        pts = ", ".join(f"{k} KiB {u:.1f} us"
                        for k, u in zip(sc["kib"], sc["us"], strict=True))
        out += ["", "One PAGEMAP_SCAN (this process, a populated registered 64 MiB buffer "
                "whose pages are unprotected, as those between armed pages are): "
                f"{sc['us_per_call']:.2f} us a call + {sc['ns_per_page']:.2f} ns a page "
                f"walked ({pts}; {sc['ns_per_page_protected']:.2f} ns a page when all are "
                "protected and nothing matches), so joining armed pages into one scan pays "
                f"for gaps up to {sc['break_even_mib']:.2f} MiB (SCAN_JOIN is "
                f"{sc['scan_join_mib']:g} MiB); one protect ioctl of a page "
                f"{sc['protect_us']:.2f} us with no other CPU running the mm (the target's "
                "threads make it a TLB-flush IPI too)."]
    fl = res.get("floor")
    if fl:
        (a, b), (sa, sb) = fl["running"], fl["stopped"]
        out += ["", "Floors, measured beside the loop: a bare C process sleeping in ppoll("
                f"{fl['sleeper']['period_us'] / 1000:g} ms) costs "
                f"{fl['sleeper']['cpu_us_per_turn']:.0f} us of CPU per wake-up "
                "(bench/workloads/sleeper.c: the kernel's sleep and wake-up, which every loop "
                "that sleeps between turns pays); a turn of the C loop with no region "
                f"{fl['empty_turn']['cpu_us_per_turn']:.0f} us. With the target stopped "
                f"(SIGSTOP) a turn costs {sa['cpu_us_per_turn']:.0f} / "
                f"{sb['cpu_us_per_turn']:.0f} us at {sa['regions']} / {sb['regions']} regions, "
                f"{fl['stopped_us_per_page']:.2f} us per armed page; running, "
                f"{a['cpu_us_per_turn']:.0f} / {b['cpu_us_per_turn']:.0f} us, "
                f"{fl['running_us_per_page']:.2f} us per armed page: the difference is the "
                "TLB-flush IPI each protect sends to the CPUs running the target."]
        if "buffer_R_us_per_page" in fl:
            out += ["", "Which pages pay the IPI: with every region in the buffer the target "
                    f"only reads, an armed page costs {fl['buffer_R_us_per_page']:.2f} us "
                    "(its pages were protected once when the mapping was registered and "
                    "stay so: protecting them again changes no PTE and flushes nothing); in "
                    f"the buffer it writes all the time, {fl['buffer_W_us_per_page']:.2f} us "
                    "(each armed page was written since it was last protected, so its PTE "
                    "is writable and must be flushed from the other CPU)."]
    c = res.get("cli")
    if c:
        out += ["", f"The whole session (`udamon record --primitive {res['mode']} --regions "
                f"{c['regions_opt']}`, DAMON's default intervals, same target): "
                f"{c['cpu_pct']:.2f}% of one CPU steady (start-up left out), "
                f"{c['mean_regions']:.0f} regions on average, {c['snapshots_per_s']:.1f} "
                f"snapshots/s (10 due), peak RSS {c['peak_rss_mib']:.0f} MiB."]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("wp", "rwp"), default="wp")
    ap.add_argument("--regions", default="10,20,50,100,200,500,1000")
    ap.add_argument("--turns", type=int, default=400, help="turns per measurement")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    try:
        regions = tuple(int(x) for x in a.regions.split(","))
    except ValueError:
        ap.error("--regions: a comma-separated list of numbers")
    res = run(a.mode, regions, a.turns, log=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(markdown(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if "skipped" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
