"""The machine's CPU topology from sysfs: the CPU-to-node map (read once, for the
per-report hot path, or one given for input recorded elsewhere: "0-3=0,4-7=1"), CPU
lists, and the last-level-cache domains and NUMA nodes that cache-aware thread
placement works with."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

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


# -- CPU lists, cache (LLC) domains and NUMA nodes ------------------------------------

CPU_ROOT = "/sys/devices/system/cpu"


def format_cpulist(cpus) -> str:
    """Sorted unique CPUs -> the kernel's list format: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(set(int(c) for c in cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def online_cpus_of(cpu_root: str = CPU_ROOT) -> list[int]:
    """The online CPUs (``online``; ``present`` or the CPU directories when it is absent)."""
    for name in ("online", "present"):
        text = _read(os.path.join(cpu_root, name))
        if text:
            try:
                return parse_cpulist(text)
            except ValueError:
                pass
    try:
        return sorted(int(m.group(1)) for n in os.listdir(cpu_root)
                      if (m := re.fullmatch(r"cpu(\d+)", n)))
    except OSError:
        return list(range(os.cpu_count() or 1))


def node_cpus(node_root: str = NODE_ROOT) -> dict[int, list[int]]:
    """NUMA node -> its CPUs (nodes without CPUs included, with an empty list)."""
    out: dict[int, list[int]] = {}
    try:
        names = os.listdir(node_root)
    except OSError:
        return out
    for name in names:
        m = re.fullmatch(r"node(\d+)", name)
        if not m:
            continue
        text = _read(os.path.join(node_root, name, "cpulist"))
        try:
            out[int(m.group(1))] = parse_cpulist(text or "")
        except ValueError:
            continue
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Domain:
    """CPUs that share one last-level cache (or, without cache information, a node)."""

    id: int
    cpus: tuple[int, ...]
    nodes: tuple[int, ...]
    prefix: str = "llc"  # "node" for NUMA-node domains, "dom" for domains given by hand

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.id}"

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "cpus": list(self.cpus),
                "cpulist": format_cpulist(self.cpus), "nodes": list(self.nodes)}


@dataclass(frozen=True)
class Topology:
    cpus: tuple[int, ...]  # online CPUs
    domains: tuple[Domain, ...]  # disjoint, cover every online CPU
    nodes: dict[int, tuple[int, ...]]  # NUMA node -> its online CPUs
    level: str  # what a domain is: "L3", "L2", "node", "given" ...
    source: str  # where it came from, for people

    def domain_of_cpu(self) -> dict[int, int]:
        return {c: d.id for d in self.domains for c in d.cpus}

    def to_dict(self) -> dict:
        return {"cpus": format_cpulist(self.cpus), "level": self.level, "source": self.source,
                "domains": [d.to_dict() for d in self.domains],
                "nodes": {str(n): format_cpulist(c) for n, c in self.nodes.items()}}


def _cpu_llc(cpu_root: str, cpu: int) -> tuple[int, list[int]] | None:
    """(level, shared CPUs) of the CPU's highest-level data or unified cache."""
    best: tuple[int, list[int]] | None = None
    cache = os.path.join(cpu_root, f"cpu{cpu}", "cache")
    try:
        names = os.listdir(cache)
    except OSError:
        return None
    for name in names:
        if not re.fullmatch(r"index\d+", name):
            continue
        d = os.path.join(cache, name)
        if _read(os.path.join(d, "type")) == "Instruction":
            continue
        level, shared = _read(os.path.join(d, "level")), _read(os.path.join(d, "shared_cpu_list"))
        if not level or not level.isdigit() or not shared:
            continue
        try:
            cpus = parse_cpulist(shared)
        except ValueError:
            continue
        if best is None or int(level) > best[0]:
            best = (int(level), cpus)
    return best


def _domains(groups: list[list[int]], nodes: dict[int, list[int]],
             prefix: str = "llc") -> tuple[Domain, ...]:
    c2n = {c: n for n, cs in nodes.items() for c in cs}
    groups = sorted((sorted(g) for g in groups if g), key=lambda g: g[0])
    return tuple(Domain(i, tuple(g), tuple(sorted({c2n[c] for c in g if c in c2n})), prefix)
                 for i, g in enumerate(groups))


def read_topology(cpu_root: str = CPU_ROOT, node_root: str = NODE_ROOT) -> Topology:
    """LLC domains from ``cpu*/cache/index*/shared_cpu_list`` (the highest level that is
    not an instruction cache), NUMA nodes from ``node*/cpulist``.  Offline CPUs are left
    out of both.  Without cache information for every CPU, each NUMA node is a domain
    (and the whole machine one when there is no node information either)."""
    online = online_cpus_of(cpu_root)
    on = set(online)
    nodes = {n: [c for c in cs if c in on] for n, cs in node_cpus(node_root).items()}
    llc = {c: _cpu_llc(cpu_root, c) for c in online}
    if online and all(v is not None for v in llc.values()):
        levels = {v[0] for v in llc.values() if v is not None}
        seen: dict[int, int] = {}  # cpu -> group index
        groups: list[list[int]] = []
        for c in online:
            if c in seen:
                continue
            shared = [x for x in llc[c][1] if x in on and x not in seen] or [c]  # type: ignore
            if c not in shared:
                shared.append(c)
            for x in shared:
                seen[x] = len(groups)
            groups.append(shared)
        lv = f"L{max(levels)}" if len(levels) == 1 else "/".join(f"L{x}" for x in sorted(levels))
        return Topology(tuple(online), _domains(groups, nodes),
                        {n: tuple(c) for n, c in nodes.items()}, lv,
                        f"{cpu_root}/cpu*/cache/index*/shared_cpu_list")
    with_cpus = [cs for cs in nodes.values() if cs]
    covered = {c for cs in with_cpus for c in cs}
    if with_cpus and covered == on:
        return Topology(tuple(online), _domains(with_cpus, nodes, "node"),
                        {n: tuple(c) for n, c in nodes.items()}, "node",
                        f"no cache information in {cpu_root}: one domain per NUMA node "
                        f"({node_root})")
    return Topology(tuple(online), _domains([online], nodes, "dom"),
                    {n: tuple(c) for n, c in nodes.items()}, "machine",
                    f"no cache or node information in {cpu_root}, {node_root}: "
                    "the machine is one domain")


def given_topology(groups: list[list[int]], base: Topology) -> Topology:
    """Domains given by hand (``--domains 0-3/4-7``) over this machine's CPUs and nodes;
    ValueError when they overlap or name a CPU that is not online."""
    on = set(base.cpus)
    seen: set[int] = set()
    for g in groups:
        if not g:
            raise ValueError("a domain needs at least one CPU")
        bad = sorted(set(g) - on)
        if bad:
            raise ValueError(f"CPU {format_cpulist(bad)} is not online here "
                             f"(online: {format_cpulist(on)})")
        if seen & set(g):
            raise ValueError(f"CPU {format_cpulist(seen & set(g))} is in two domains")
        seen |= set(g)
    nodes = {n: list(c) for n, c in base.nodes.items()}
    return Topology(base.cpus, _domains(groups, nodes, "dom"), base.nodes, "given",
                    "given with --domains")


def node_topology(base: Topology) -> Topology:
    """One domain per NUMA node with CPUs (``--domains node``)."""
    groups = [list(c) for c in base.nodes.values() if c]
    if not groups:
        groups = [list(base.cpus)]
    return Topology(base.cpus, _domains(groups, {n: list(c) for n, c in base.nodes.items()},
                                        "node"), base.nodes, "node", "NUMA nodes (--domains node)")
