"""Intake and filter throughput: reports per second through the batch call, and the
cost per report of counting with N probes.

    python bench/bench_intake.py [--reports 2000000] [--repeat 5]

Prints a markdown table (median and spread over repeats) and the ratio to the
5 M reports/s per core goal of the intake.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import udamon
from udamon import Attrs, Monitor, Probe

GOAL = 5_000_000
MS = 1_000_000


def make_batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return udamon.make_reports(
        time_ns=np.sort(rng.integers(0, 1000 * MS, n)), pid=1,
        addr=0x7F0000000000 + rng.integers(0, 1 << 30, n).astype(np.uint64),
        cpu=rng.integers(0, 8, n), node=rng.integers(0, 2, n), tid=rng.integers(100, 116, n),
        write=rng.random(n) < 0.3)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_intake(batch: np.ndarray, chunk: int, repeat: int) -> list[float]:
    def run():
        mon = Monitor(buffer_capacity=batch.size + 1)
        for i in range(0, batch.size, chunk):
            mon.report_batch(batch[i:i + chunk])
        assert mon.stats.accepted == batch.size
    return [batch.size / s for s in timed(run, repeat)]


def bench_pipeline(batch: np.ndarray, nprobes: int, repeat: int) -> list[float]:
    names = ["write", "read", "cpus:0-3", "nodes:1", "threads:100-107", "cpus:4,write",
             "!threads:100", "addr:0x7f0000000000-0x7f0020000000"]
    probes = [Probe.parse(f"p{i}={names[i % len(names)]}") for i in range(nprobes)]

    def run():
        mon = Monitor(Attrs(), udamon.parse_conditions("cpus:0-5"), probes, seed=1,
                      buffer_capacity=batch.size + 1)
        mon.add_target(1, [(0x7F0000000000, 0x7F0000000000 + (1 << 30))])
        mon.start(0)
        for i in range(0, batch.size, 100_000):
            mon.report_batch(batch[i:i + 100_000])
            mon.advance(int(batch["time_ns"][min(i + 100_000, batch.size) - 1]))
        mon.advance(1001 * MS)
    return [batch.size / s for s in timed(run, repeat)]


def fmt(rates: list[float]) -> tuple[str, str]:
    med = statistics.median(rates)
    return f"{med / 1e6:.2f} M/s", f"{(max(rates) - min(rates)) / 1e6:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=2_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = p.parse_args()
    batch = make_batch(a.reports)
    rows = []
    for chunk in (1_000, 10_000, 100_000):
        r = bench_intake(batch, chunk, a.repeat)
        rows.append({"what": f"intake, batches of {chunk:,}", "rates": r,
                     "ratio_to_goal": statistics.median(r) / GOAL})
    base = None
    for n in (0, 1, 2, 4, 8, 16):
        r = bench_pipeline(batch[: a.reports // 2], n, a.repeat)
        med = statistics.median(r)
        base = base or med
        rows.append({"what": f"intake + filters + counting, {n} probes", "rates": r,
                     "ns_per_report": 1e9 / med,
                     "extra_ns_per_report_per_probe": (1e9 / med - 1e9 / base) / n if n else 0})
    print("| what | median | spread | note |\n|---|---|---|---|")
    for row in rows:
        m, s = fmt(row["rates"])
        if "ratio_to_goal" in row:
            note = f"{row['ratio_to_goal']:.1f}x the 5 M/s goal"
        else:
            note = f"{row['ns_per_report']:.0f} ns/report"
            if row["extra_ns_per_report_per_probe"]:
                note += f", +{row['extra_ns_per_report_per_probe']:.0f} ns per probe"
        print(f"| {row['what']} | {m} | {s} | {note} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
