"""Deterministic synthetic access reports, for tests, benchmarks and the demo.

A workload is a list of ``Stream``s: a thread on a CPU accessing a buffer at a
rate, with a given fraction of writes, during a time span.  The same seed
always gives the same reports, so tests can assert on exact outcomes and know
the ground truth (which buffer is hot, who touches it, reads or writes).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from udamon.intake.reports import SOURCE_IDS, empty
from udamon.targets.topology import nodes_of


@dataclass(frozen=True)
class Stream:
    pid: int
    tid: int
    cpu: int
    start: int  # buffer start address
    size: int  # buffer size, bytes
    rate_hz: float  # reports per second
    write_ratio: float = 0.0  # fraction of reports that are writes
    begin_ns: int = 0  # active from ...
    end_ns: int | None = None  # ... until (None: the whole run)


def generate(streams: Sequence[Stream], duration_ns: int, seed: int = 0,
             t0_ns: int = 0, page: int = 4096) -> np.ndarray:
    """All streams' reports over ``[t0, t0+duration)``, sorted by time."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in streams:
        b = max(s.begin_ns, 0)
        e = duration_ns if s.end_ns is None else min(s.end_ns, duration_ns)
        if e <= b or s.rate_hz <= 0:
            continue
        n = int(rng.poisson(s.rate_hz * (e - b) / 1e9))
        if n == 0:
            continue
        r = empty(n)
        r["time_ns"] = t0_ns + b + np.sort(rng.integers(0, e - b, n))
        r["pid"] = s.pid
        r["tid"] = s.tid
        r["cpu"] = s.cpu
        r["node"] = nodes_of(np.full(n, s.cpu))
        npages = max(s.size // page, 1)
        r["addr"] = np.uint64(s.start) + rng.integers(0, npages, n).astype(np.uint64) * np.uint64(
            page)
        r["size"] = page
        r["write"] = rng.random(n) < s.write_ratio
        r["source"] = SOURCE_IDS["synthetic"]
        parts.append(r)
    if not parts:
        return empty(0)
    out = np.concatenate(parts)
    return out[np.argsort(out["time_ns"], kind="stable")]


def write_csv(reports: np.ndarray, path: str) -> None:
    """Write reports in the replay CSV format (DESIGN.md)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time_ns", "pid", "tid", "cpu", "addr", "size", "write"])
        cols = [reports[c].tolist() for c in ("time_ns", "pid", "tid", "cpu", "addr", "size")]
        writes = reports["write"].astype(int).tolist()
        w.writerows(zip(*cols, writes, strict=True))


MiB = 1 << 20


def demo_workload(pid: int = 4242) -> list[Stream]:
    """Two threads on CPUs 0 and 1: a read-mostly buffer, a written buffer, a
    buffer both share, and an idle buffer no one touches after a start-up
    burst.  Used by ``udamon demo`` and the end-to-end tests."""
    base = 0x7F00_0000_0000
    reader, writer = pid + 1, pid + 2
    return [
        Stream(pid, reader, 0, base, 16 * MiB, 50_000, 0.0),  # R: read by the reader
        Stream(pid, writer, 1, base + 32 * MiB, 16 * MiB, 50_000, 1.0),  # W: written
        Stream(pid, reader, 0, base + 64 * MiB, 8 * MiB, 20_000, 0.0),  # S: shared, reads
        Stream(pid, writer, 1, base + 64 * MiB, 8 * MiB, 20_000, 1.0),  # S: shared, writes
        Stream(pid, pid, 0, base + 96 * MiB, 16 * MiB, 100_000, 0.5, 0, 200_000_000),  # I
    ]


DEMO_BUFFERS = {"R": (0, 16), "W": (32, 48), "S": (64, 72), "I": (96, 112)}  # MiB offsets
