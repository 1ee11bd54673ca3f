"""The access report: the unit every primitive produces and every filter reads.

A report is DAMON's ``struct damon_access_report`` plus what user space can
add: the pid of the target, the NUMA node of the CPU and the source that saw it.
Reports travel in numpy structured arrays so that filtering and region
matching stay vectorised.
"""

from __future__ import annotations

import numpy as np

REPORT_DTYPE = np.dtype(
    [
        ("time_ns", np.int64),  # CLOCK_MONOTONIC for live sources; replay keeps the input's clock
        ("pid", np.int32),  # target process (tgid)
        ("tid", np.int32),  # thread that made the access; -1 when unknown
        ("cpu", np.int32),  # CPU that made the access; -1 when unknown
        ("node", np.int32),  # NUMA node of that CPU; -1 when unknown
        ("addr", np.uint64),  # start virtual address
        ("size", np.uint64),  # bytes accessed (a page for fault-based sources)
        ("write", np.bool_),
        ("source", np.uint8),  # index into SOURCES
        # where the data was served from, when the source knows (precise sampling's
        # data_src): index into MEM_LEVELS; 0 = unknown
        ("mem", np.uint8),
        # NUMA node of the accessed page (live sessions look it up with move_pages;
        # replay input may carry it); -1 when unknown.  With ``node`` it says whether
        # the access was local or remote.
        ("page_node", np.int32),
    ]
)

# Names of the report sources; the index is what a report stores.  Append only:
# record files and external reporters rely on the numbers.
SOURCES: tuple[str, ...] = (
    "api",
    "replay",
    "synthetic",
    "hint",
    "wp",
    "rwp",
    "pmu",
    "kernel",
    "external",
    "perf",  # imported from `perf script` output (mem samples are "pmu")
)
SOURCE_IDS: dict[str, int] = {name: i for i, name in enumerate(SOURCES)}

# Where an access was served from (perf's data_src, decoded by
# udamon.primitives.perf_mem): the node-level split NUMA placement needs.  Append only:
# the wire format and records store the numbers.  "cache": a cache of the accessing
# CPU's node; "ram": memory of its node; "remote-ram"/"remote-cache": another node's
# memory or cache; "other": I/O, uncached.  A cache hit says nothing about the page's node.
MEM_LEVELS: tuple[str, ...] = ("unknown", "cache", "ram", "remote-ram", "remote-cache", "other")
MEM_IDS: dict[str, int] = {name: i for i, name in enumerate(MEM_LEVELS)}


def source_id(name: str) -> int:
    try:
        return SOURCE_IDS[name]
    except KeyError:
        raise ValueError(f"unknown report source {name!r} (known: {', '.join(SOURCES)})") from None


def empty(n: int = 0) -> np.ndarray:
    """A zeroed report array of length ``n`` with unknown tid/cpu/node/page_node."""
    a = np.zeros(n, dtype=REPORT_DTYPE)
    a["tid"] = -1
    a["cpu"] = -1
    a["node"] = -1
    a["page_node"] = -1
    return a


def make(
    *,
    time_ns,
    pid,
    addr,
    size=4096,
    tid=-1,
    cpu=-1,
    node=-1,
    write=False,
    source: str | int = "api",
    mem=0,
    page_node=-1,
) -> np.ndarray:
    """Build a report array from scalars or equal-length sequences (broadcast)."""
    cols = np.broadcast_arrays(
        np.asarray(time_ns, dtype=np.int64),
        np.asarray(pid, dtype=np.int32),
        np.asarray(tid, dtype=np.int32),
        np.asarray(cpu, dtype=np.int32),
        np.asarray(node, dtype=np.int32),
        np.asarray(addr, dtype=np.uint64),
        np.asarray(size, dtype=np.uint64),
        np.asarray(write, dtype=np.bool_),
        np.asarray(mem, dtype=np.uint8),
        np.asarray(page_node, dtype=np.int32),
    )
    n = cols[0].size
    out = np.empty(n, dtype=REPORT_DTYPE)
    for name, col in zip((*REPORT_DTYPE.names[:8], "mem", "page_node"), cols, strict=True):
        out[name] = col.reshape(-1)
    out["source"] = source if isinstance(source, int) else source_id(source)
    return out
