"""Which NUMA node holds a process's pages: move_pages(2) in query mode.

With ``nodes == NULL`` move_pages moves nothing and fills ``status`` with the
node of each page, or a negative errno (-ENOENT: not present, -EFAULT: not
mapped).  Live sessions look up the node of every reported page this way
(``PageNodeLookup``), so that each report says whether it was local or remote.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from udamon.arrays import sorted_unique

_NR_MOVE_PAGES = {"x86_64": 279, "aarch64": 239, "riscv64": 239}
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def query_nodes(pid: int, addrs: np.ndarray) -> np.ndarray:
    """Node of each page (int32), negative errno where it has none; raises OSError
    when the call itself fails (no such process, not permitted)."""
    nr = _NR_MOVE_PAGES.get(platform.machine())
    if nr is None:
        raise OSError(38, f"move_pages: unsupported architecture {platform.machine()}")
    addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
    n = addrs.size
    status = np.zeros(n, dtype=np.int32)
    if n == 0:
        return status
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(pid), ctypes.c_ulong(n),
                        ctypes.c_void_p(addrs.ctypes.data), ctypes.c_void_p(None),
                        ctypes.c_void_p(status.ctypes.data), ctypes.c_int(0))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return status


@dataclass
class LookupStats:
    calls: int = 0  # move_pages queries
    pages: int = 0  # pages asked about
    reports: int = 0  # reports given a page node (or found to have none)
    cpu_s: float = 0.0  # thread CPU time spent in lookups

    def note(self) -> str:
        per = self.cpu_s / self.reports * 1e6 if self.reports else 0.0
        return (f"page nodes: {self.reports} reports placed with {self.calls} move_pages "
                f"queries of {self.pages} distinct pages ({self.cpu_s * 1e3:.1f} ms of CPU, "
                f"{per:.2f} us per report)")


def _query(pid: int, pages: np.ndarray) -> np.ndarray:
    """query_nodes, through a live thread when the main thread has exited (move_pages of
    a zombie leader's pid sees no memory: EINVAL)."""
    try:
        return query_nodes(pid, pages)
    except OSError:
        from udamon.targets.procmaps import mm_task

        tid = mm_task(pid, missing_ok=True)
        if tid is None or tid == pid:
            raise
        return query_nodes(tid, pages)


def memory_nodes() -> list[int]:
    """The NUMA nodes that have memory (/sys/devices/system/node/has_memory)."""
    from udamon.targets.topology import parse_cpulist

    try:
        with open("/sys/devices/system/node/has_memory") as f:
            return parse_cpulist(f.read())
    except (OSError, ValueError):
        return []


@dataclass
class PageNodeLookup:
    """The node of each reported page (``page_node``), from batched move_pages queries.

    Within one aggregation interval a page is asked about once (a cache of the pages
    seen); ``new_interval()`` forgets them, because the kernel's NUMA balancing or
    ``udamon migrate`` may move pages between intervals.  Pages that are not present
    (or not mapped) keep ``page_node`` -1.  On a machine whose memory is all on one
    node, every page is there: no query is made."""

    stats: LookupStats = field(default_factory=LookupStats)
    only_node: int | None = field(default_factory=lambda: (lambda n: n[0] if len(n) == 1
                                                           else None)(memory_nodes()))
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _broken: set[int] = field(default_factory=set)  # pids that cannot be queried

    def new_interval(self) -> None:
        self._cache.clear()

    def annotate(self, reports: np.ndarray, page: int = 4096) -> None:
        """Fill ``reports["page_node"]`` where it is unknown (in place)."""
        if reports.size == 0:
            return
        t0 = time.thread_time()
        todo = reports["page_node"] < 0
        if self.only_node is not None:  # one node holds all memory: nothing to ask
            reports["page_node"][todo] = self.only_node
            self.stats.reports += int(np.count_nonzero(todo))
            self.stats.cpu_s += time.thread_time() - t0
            return
        pids = reports["pid"][todo]
        for pid in sorted_unique(pids).tolist():
            if pid in self._broken:
                continue
            sel = np.flatnonzero(todo & (reports["pid"] == pid))
            pages = reports["addr"][sel] & ~np.uint64(page - 1)
            known_p, known_n = self._cache.get(pid, (np.zeros(0, np.uint64),
                                                     np.zeros(0, np.int32)))
            uniq = sorted_unique(pages)
            new = uniq[~np.isin(uniq, known_p, assume_unique=True)] if known_p.size else uniq
            if new.size:
                try:
                    nodes = _query(pid, new)
                except OSError:
                    self._broken.add(pid)  # gone, or not ours to query: unknown from now on
                    continue
                self.stats.calls += 1
                self.stats.pages += int(new.size)
                allp = np.concatenate((known_p, new))
                alln = np.concatenate((known_n, nodes))
                order = np.argsort(allp, kind="stable")
                known_p, known_n = allp[order], alln[order]
                self._cache[pid] = (known_p, known_n)
            i = np.searchsorted(known_p, pages)
            node = known_n[np.minimum(i, known_n.size - 1)]
            reports["page_node"][sel] = np.where(node >= 0, node, -1)
            self.stats.reports += int(sel.size)
        self.stats.cpu_s += time.thread_time() - t0
