"""CPU to NUMA node maps: this machine's (read from sysfs once) or one given for
input recorded elsewhere ("0-3=0,4-7=1")."""

from __future__ import annotations

import functools
import os
import re

import numpy as np

NODE_ROOT = "/sys/devices/system/node"


def parse_cpulist(text: str) -> list[int]:
    """Parse the kernel's list format ("0-3,8,10-11") into sorted unique ints."""
    out: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad list item {part!r} (expected N or N-M)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad range {part!r} (end before start)")
        if hi - lo > 1 << 20:
            raise ValueError(f"range {part!r} is too large")
        out.update(range(lo, hi + 1))
    return sorted(out)


@functools.cache
def cpu_to_node() -> np.ndarray:
    """Array indexed by CPU number giving its node (-1 when unknown)."""
    pairs: list[tuple[int, int]] = []
    try:
        entries = os.listdir(NODE_ROOT)
    except OSError:
        entries = []
    for name in entries:
        m = re.fullmatch(r"node(\d+)", name)
        if not m:
            continue
        try:
            with open(os.path.join(NODE_ROOT, name, "cpulist")) as f:
                cpus = parse_cpulist(f.read())
        except (OSError, ValueError):
            continue
        pairs.extend((c, int(m.group(1))) for c in cpus)
    ncpu = max([c for c, _ in pairs] + [os.cpu_count() or 1]) + 1
    table = np.full(ncpu, -1, dtype=np.int32)
    if pairs:
        for c, n in pairs:
            table[c] = n
    else:  # no sysfs node info: a single-node machine
        table[:] = 0
    return table


def parse_cpu_nodes(text: str) -> np.ndarray:
    """Parse a CPU-to-node map ``CPUS=NODE[,CPUS=NODE...]`` with CPUS in the kernel's
    list format joined by ``+`` (``0-3=0,4-7=1``, ``0-1+4-5=0``) into a table like
    cpu_to_node()'s; CPUs it does not name map to -1 (unknown)."""
    pairs: list[tuple[int, int]] = []
    for item in text.split(","):
        cpus, eq, node = item.strip().partition("=")
        if not eq or not node.strip().isdigit():
            raise ValueError(f"bad CPU-to-node item {item.strip()!r} (expected CPUS=NODE, "
                             "e.g. 0-3=0)")
        listed = parse_cpulist(cpus.replace("+", ","))
        if not listed:
            raise ValueError(f"bad CPU-to-node item {item.strip()!r}: no CPUs")
        pairs.extend((c, int(node)) for c in listed)
    seen: dict[int, int] = {}
    for c, n in pairs:
        if seen.setdefault(c, n) != n:
            raise ValueError(f"CPU {c} is mapped to nodes {seen[c]} and {n}")
    table = np.full(max(seen) + 1, -1, dtype=np.int32)
    for c, n in seen.items():
        table[c] = n
    return table


def nodes_of(cpus: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """Vectorised CPU -> node with ``table`` (default: this machine's map); -1 for
    unknown or out-of-range CPUs."""
    table = cpu_to_node() if table is None else table
    cpus = np.asarray(cpus, dtype=np.int64)
    ok = (cpus >= 0) & (cpus < table.size)
    out = np.full(cpus.shape, -1, dtype=np.int32)
    out[ok] = table[cpus[ok]]
    return out
