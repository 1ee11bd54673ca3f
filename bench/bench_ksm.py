"""KSM advisor: its candidates and predicted saving against the real KSM of this host.

    .venv/bin/python bench/bench_ksm.py [--runs 3] [--json FILE]

Workload: tests/workloads/ksm_dup.c, four 32 MiB regions of 4-way duplicate
pages, written never / 2000 pages/s / 5 pages/s / read only.  Truth: a second
instance offers all four regions to KSM itself; after ksmd has merged it (fast
settings: 4000 pages per 10 ms, restored at the end), the share of each region's
pages that are KSM pages (pagemap -> PFN -> kpageflags KPF_KSM), twice, 5 s
apart.  Per run, a fresh instance and ``udamon ksm-advise --apply --ksm-run`` at
its defaults: the regions its candidates cover, its predicted saving against
``(ksm_merging_pages + ksm_zero_pages) x 4 KiB`` afterwards, its CPU time.  And
the content hashing's speed on 1 GiB of a target.  Waits while other
processes offer memory to KSM (their memory would be merged too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from workloads.build import build  # noqa: E402

from udamon.targets import ksm  # noqa: E402

PAGE = 4096
MIB = 1 << 20
FAST = {"pages_to_scan": "4000", "sleep_millisecs": "10"}


class Workload:
    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([build("ksm_dup"), *args], stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())
        self.regions = {r["name"]: (r["start"], r["end"]) for r in self.info["regions"]}

    def merged(self) -> dict[str, float]:
        return {n: float(ksm.page_flags(self.p.pid, lo, hi)[1].mean())
                for n, (lo, hi) in self.regions.items()}

    def ok(self) -> bool:
        os.kill(self.p.pid, signal.SIGUSR1)
        return bool(json.loads(self.p.stdout.readline())["ok"])

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


def covered(w: Workload, cands: list[dict]) -> list[str]:
    out = []
    for name, (lo, hi) in w.regions.items():
        pages = sum(c["pages"] * (min(hi, c["end"]) - max(lo, c["start"]))
                    / (c["end"] - c["start"]) for c in cands
                    if min(hi, c["end"]) > max(lo, c["start"]))
        if pages >= 0.5 * (hi - lo) / PAGE:
            out.append(name)
    return out


def truth(log) -> dict:
    from udamon.system.sysctl_guard import SettingsGuard

    w = Workload("--mergeable", "--seed", "7")
    guard = SettingsGuard(handle_signals=False)
    try:
        for k, v in FAST.items():
            guard.set(f"{ksm.KSM_DIR}/{k}", v)
        guard.set(f"{ksm.KSM_DIR}/run", "1")
        t0 = time.monotonic()
        last, since = None, ksm.counters()["full_scans"]
        while time.monotonic() - t0 < 90:
            time.sleep(1)
            cur = int(ksm.ksm_stat(w.p.pid).get("ksm_merging_pages", 0))
            scans = ksm.counters()["full_scans"]
            if last is None or abs(cur - last) > 64:
                last, since = cur, scans
            elif scans - since >= 3:
                break
        first = w.merged()
        time.sleep(5)
        second = w.merged()
        ok = w.ok()
    finally:
        w.stop()
        guard.restore()
    kept = [n for n in first if first[n] >= 0.5 and second[n] >= 0.5]
    log(f"  truth: merged {first} then {second}; kept {kept}; data ok {ok}")
    return {"first": first, "second": second, "kept": kept, "data_ok": ok,
            "merge_s": time.monotonic() - t0}


def advisor_run(seed: int, log) -> dict:
    w = Workload("--seed", str(seed))
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "udamon", "ksm-advise", "--pid",
                            str(w.p.pid), "--apply", "--ksm-run", "--ksm-pages-to-scan",
                            FAST["pages_to_scan"], "--ksm-sleep", FAST["sleep_millisecs"] + "ms",
                            "--format", "json", "-q"], capture_output=True, text=True,
                           timeout=300)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise RuntimeError(p.stderr.strip())
        doc = json.loads(p.stdout)
        (t,) = doc["targets"]
        (ap,) = doc["apply"]["targets"]
        out = {"candidates": covered(w, t["candidates"]), "ranges": len(t["candidates"]),
               "predicted_bytes": ap["predicted_saving"], "actual_bytes": ap["actual_saving"],
               "wait_s": doc["apply"]["waited_ns"] / 1e9, "wall_s": wall,
               "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
               "merged_after": w.merged(), "data_ok": w.ok()}
        log(f"  run: candidates {out['candidates']}, predicted {out['predicted_bytes'] / MIB:.1f}"
            f" MiB, actual {out['actual_bytes'] / MIB:.1f} MiB, cpu {out['cpu_s']:.2f} s")
        return out
    finally:
        w.stop()


def hash_speed(log) -> dict:
    import numpy as np

    from udamon.primitives.page_scan import SpanScanner
    from udamon.targets.content import hash_runs

    w = Workload("--mib", "256", "--hot", "0", "--slow", "0", "--read", "0")
    try:
        fd = os.open(f"/proc/{w.p.pid}/pagemap", os.O_RDONLY)
        lo = np.asarray([r[0] for r in w.regions.values()], np.uint64)
        hi = np.asarray([r[1] for r in w.regions.values()], np.uint64)
        order = np.argsort(lo)
        rlo, rhi, _ = SpanScanner().resident(fd, lo[order], hi[order])
        os.close(fd)
        t0 = time.perf_counter()
        addr, _, _ = hash_runs(w.p.pid, rlo, rhi)
        dt = time.perf_counter() - t0
    finally:
        w.stop()
    gb = addr.size * PAGE / 1e9
    log(f"  hashing: {addr.size} pages in {dt:.2f} s = {gb / dt:.2f} GB/s")
    return {"pages": int(addr.size), "seconds": dt, "gb_per_s": gb / dt}


def markdown(res: dict) -> list[str]:
    if "skipped" in res:
        return [f"skipped: {res['skipped']}", ""]
    tr = res["truth"]
    out = ["Four 32 MiB regions of 4-way duplicate pages (tests/workloads/ksm_dup.c). Real "
           "KSM, all four regions offered by the workload itself: share of each region's "
           "pages that are KSM pages once merged, and 5 s later:", "",
           "| region | merged | 5 s later |", "|---|---|---|"]
    for n in tr["first"]:
        out.append(f"| {n} | {tr['first'][n]:.1%} | {tr['second'][n]:.1%} |")
    out += ["", f"KSM keeps merged (>= 50 %): {', '.join(tr['kept'])}.", "",
            "`udamon ksm-advise --apply --ksm-run` at its defaults (10 s of write watching), "
            "a fresh workload per run:", "",
            "| run | regions the candidates cover | ranges | predicted saving | actual "
            "(ksm_stat) | actual / predicted | udamon CPU | wall (incl. waiting for KSM) |",
            "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(res["runs"]):
        out.append(f"| {i + 1} | {', '.join(r['candidates'])} | {r['ranges']} | "
                   f"{r['predicted_bytes'] / MIB:.1f} MiB | {r['actual_bytes'] / MIB:.1f} MiB | "
                   f"{r['actual_bytes'] / max(r['predicted_bytes'], 1):.3f} | {r['cpu_s']:.2f} s"
                   f" | {r['wall_s']:.1f} s |")
    h = res["hash"]
    out += ["", f"Content hashing (process_vm_readv + the numpy hash) of a 1 GiB target: "
            f"{h['gb_per_s']:.2f} GB/s ({h['pages']} pages in {h['seconds']:.2f} s).", ""]
    return out


def run(runs: int, log, wait_s: float = 300) -> dict:
    ok, why = ksm.available()
    if not ok:
        return {"skipped": why}
    t0 = time.monotonic()
    while others := ksm.mergeable_processes({os.getpid()}):
        if time.monotonic() - t0 > wait_s:
            return {"skipped": f"other processes offer memory to KSM: {others[:3]}"}
        time.sleep(5)
    before = ksm.settings()
    res = {"truth": truth(log), "runs": [advisor_run(i + 1, log) for i in range(runs)],
           "hash": hash_speed(log)}
    res["settings_restored"] = ksm.settings() == before
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_ksm.py: needs root", file=sys.stderr)
        return 1
    res = run(a.runs, lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(markdown(res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
