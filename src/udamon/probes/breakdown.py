"""Automatic probes for ``--breakdown``: who made the accesses, and how.

Names are a contract (DESIGN.md): ``cpu:<n>``, ``node:<n>``, ``thread:<tid>``,
``write`` and ``read``, and ``local`` / ``remote`` (``numa``: the accessing CPU's
node against the page's node); reports look them up by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from udamon.errors import ParameterError
from udamon.probes.filters import parse_conditions
from udamon.probes.probe import Probe

KINDS = ("cpu", "node", "thread", "rw", "numa")
# 'auto': what later reports need, where it is affordable (a live udamon record's default)
AUTO = "auto"
MAX_CPU_PROBES = 64
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
            if k == "none":
                continue
            if k not in KINDS + (AUTO,):
                raise ValueError(f"unknown breakdown {k!r} (choose from "
                                 f"{', '.join(KINDS + (AUTO, 'none'))})")
            if k not in out:
                out.append(k)
    return out


def expand_auto(kinds: list[str], *, ncpus: int, nnodes: int,
                ntids: int) -> tuple[list[str], list[str]]:
    """``auto`` -> the kinds later reports need (cpu, rw, node with two nodes or more,
    thread), each only when its probes stay within the caps; the notes say what was
    left out and why."""
    if AUTO not in kinds:
        return kinds, []
    out = [k for k in kinds if k != AUTO]
    notes = []
    want = ["cpu", "rw"] + (["node"] if nnodes > 1 else []) + ["thread"]
    for k in want:
        if k in out:
            continue
        if k == "cpu" and ncpus > MAX_CPU_PROBES:
            notes.append(f"breakdown auto: no cpu probes ({ncpus} CPUs, more than "
                         f"{MAX_CPU_PROBES}); a cpus: probe selects some")
        elif k == "thread" and ntids > MAX_THREAD_PROBES:
            notes.append(f"breakdown auto: no thread probes ({ntids} threads, more than "
                         f"{MAX_THREAD_PROBES}); a threads: probe selects some")
        else:
            out.append(k)
    return out, notes


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
            raise ParameterError("breakdown", "{param} thread would add {n} probes; at most "
                                 "{most} (a probe with a threads: condition selects a "
                                 "subset)", n=len(tids), most=MAX_THREAD_PROBES)
        out += [Probe(f"thread:{t}", tuple(parse_conditions(f"threads:{t}"))) for t in tids]
    if "rw" in kinds:
        out += [Probe("write", tuple(parse_conditions("write"))),
                Probe("read", tuple(parse_conditions("read")))]
    return out
