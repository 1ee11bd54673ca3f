"""Automatic probes for ``--breakdown``: who made the accesses, and how.

Names are a contract (DESIGN.md): ``cpu:<n>``, ``node:<n>``, ``thread:<tid>``,
``write`` and ``read``, and ``local`` / ``remote`` (``numa``: the accessing CPU's
node against the page's node); reports look them up by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from udamon.probes.filters import parse_conditions
from udamon.probes.probe import Probe

KINDS = ("cpu", "node", "thread", "rw", "numa")
# breakdowns whose probes say where an access came from: by default they also steer
# region adjustment (probe weight 1), so that equally hot neighbours of different origin
# end up in different regions
ORIGIN_KINDS = ("node", "numa")
MAX_THREAD_PROBES = 64


def parse_kinds(texts: Iterable[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        for k in text.split(","):
            k = k.strip()
            if k not in KINDS:
                raise ValueError(f"unknown breakdown {k!r} (choose from {', '.join(KINDS)})")
            if k not in out:
                out.append(k)
    return out


def breakdown_probes(kinds: list[str], *, cpus: Iterable[int] = (), nodes: Iterable[int] = (),
                     tids: Iterable[int] = (), follow_origin: bool = False) -> list[Probe]:
    """``follow_origin``: the node and numa probes get weight 1 (regions follow them)."""
    out: list[Probe] = []
    w = 1 if follow_origin else 0
    if "cpu" in kinds:
        out += [Probe(f"cpu:{c}", tuple(parse_conditions(f"cpus:{c}"))) for c in sorted(cpus)]
    if "node" in kinds:
        out += [Probe(f"node:{n}", tuple(parse_conditions(f"nodes:{n}")), w)
                for n in sorted(nodes)]
    if "numa" in kinds:
        out += [Probe("local", tuple(parse_conditions("local")), w),
                Probe("remote", tuple(parse_conditions("remote")), w)]
    if "thread" in kinds:
        tids = sorted(tids)
        if len(tids) > MAX_THREAD_PROBES:
            raise ValueError(f"--breakdown thread would add {len(tids)} probes; at most "
                             f"{MAX_THREAD_PROBES} (use --probe NAME=threads:... for a subset)")
        out += [Probe(f"thread:{t}", tuple(parse_conditions(f"threads:{t}"))) for t in tids]
    if "rw" in kinds:
        out += [Probe("write", tuple(parse_conditions("write"))),
                Probe("read", tuple(parse_conditions("read")))]
    return out
