"""NUMA-aware migration: move hot, remotely accessed regions to the node that uses them.

A DAMOS-like scheme over one aggregation snapshot.  Its access pattern is
"hot and mostly accessed from one node": a region qualifies when its node
probes (``node:<n>``, from ``--breakdown node``) saw at least ``min_hits``
sampling intervals with an access and one node made at least ``min_share``
of them, and -- where the ``remote`` probe exists (``--breakdown numa``: each
report's CPU node against its page's node) -- some of its accesses were remote.
The action is ``move_pages(2)`` of the region's pages that are not
on that node yet.  A quota caps the bytes *moved* per aggregation interval
(as DAMOS's ``sz`` quota does); regions are taken hottest first, and the
last one is cut to what is left of the quota.  In dry-run mode the pages are
only located (move_pages in query mode) and counted, never moved.

move_pages migrates page contents in the kernel: the target keeps its data.
Pages that cannot move (shared with other processes without CAP_SYS_NICE,
pinned, not present) are counted by reason and left where they are.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass, field

import numpy as np

from udamon.core.locality import node_probe_hits
from udamon.core.monitor import Snapshot
from udamon.targets.page_nodes import _NR_MOVE_PAGES, query_nodes
from udamon.targets.procmaps import mm_task

PAGE = 4096
MPOL_MF_MOVE = 1 << 1
CHUNK_PAGES = 1 << 14  # pages per move_pages call: bounds one call's latency

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class MigrateParams:
    quota_bytes: int = 64 << 20  # per aggregation interval
    min_hits: int = 2  # node-probe hits (sampling intervals with an access) in the interval
    min_share: float = 0.6  # share of those hits made by the node the region moves to
    dry_run: bool = False


@dataclass
class Candidate:
    start: int
    end: int
    to_node: int
    hits: int  # all node-probe hits of the region
    share: float  # the to_node's share of them


@dataclass
class Action:
    """What one aggregation interval did (or, dry run, would have done)."""

    time_ns: int
    pid: int
    regions: list[dict] = field(default_factory=list)  # start, end, to_node, hits, share, pages
    pages_moved: int = 0  # moved (or, dry run, that would move)
    pages_local: int = 0  # already on the destination node
    pages_failed: dict[str, int] = field(default_factory=dict)  # errno name -> pages

    @property
    def bytes_moved(self) -> int:
        return self.pages_moved * PAGE

    def to_dict(self) -> dict:
        return {"time_ns": self.time_ns, "pid": self.pid, "regions": self.regions,
                "pages_moved": self.pages_moved, "pages_local": self.pages_local,
                "pages_failed": self.pages_failed}


def candidates(snap: Snapshot, params: MigrateParams) -> list[Candidate]:
    """Regions that qualify, hottest first (most node-probe hits, then highest share)."""
    nodes, h = node_probe_hits(snap)
    if not nodes or snap.start.size == 0:
        return []
    total = h.sum(axis=0)
    dom = h.argmax(axis=0)
    share = h[dom, np.arange(h.shape[1])] / np.maximum(total, 1)
    ok = (total >= params.min_hits) & (share >= params.min_share)
    remote = snap.probe_hits.get("remote")
    if remote is not None:
        ok &= np.asarray(remote) > 0  # nothing remote: nothing to gain by moving
    out = []
    for i in np.flatnonzero(ok).tolist():
        to = nodes[int(dom[i])]
        pn = snap.page_nodes[i] if snap.page_nodes is not None else None
        if pn is not None and pn.any() and set(np.flatnonzero(pn).tolist()) == {to}:
            continue  # every reported page is already there
        out.append(Candidate(int(snap.start[i]), int(snap.end[i]), to,
                             int(total[i]), float(share[i])))
    out.sort(key=lambda c: (-c.hits, -c.share, c.start))
    return out


def move_pages(pid: int, addrs: np.ndarray, node: int) -> np.ndarray:
    """move_pages(2) of ``addrs`` to ``node``; per-page status (node or -errno)."""
    nr = _NR_MOVE_PAGES.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"move_pages: unsupported architecture {platform.machine()}")
    addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
    status = np.zeros(addrs.size, dtype=np.int32)
    if addrs.size == 0:
        return status
    nodes = np.full(addrs.size, node, dtype=np.int32)
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(pid), ctypes.c_ulong(addrs.size),
                        ctypes.c_void_p(addrs.ctypes.data), ctypes.c_void_p(nodes.ctypes.data),
                        ctypes.c_void_p(status.ctypes.data), ctypes.c_int(MPOL_MF_MOVE))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return status


def _count_failures(out: dict[str, int], status: np.ndarray) -> None:
    for code, n in zip(*np.unique(-status[status < 0], return_counts=True), strict=True):
        name = errno.errorcode.get(int(code), str(int(code)))
        out[name] = out.get(name, 0) + int(n)


def apply(snap: Snapshot, params: MigrateParams) -> Action:
    """Run the scheme on one snapshot; OSError when the process cannot be queried/moved."""
    act = Action(snap.time_ns, snap.pid)
    left = params.quota_bytes // PAGE
    cands = candidates(snap, params)
    # move_pages(PID) of a zombie leader (main thread exited, others running) sees no
    # memory: ask through a live thread of the process
    task = (mm_task(snap.pid, missing_ok=True) or snap.pid) if cands else snap.pid
    for c in cands:
        if left <= 0:
            break
        pages = np.arange(c.start, c.end, PAGE, dtype=np.uint64)
        moved = local = 0
        for lo in range(0, pages.size, CHUNK_PAGES):
            if left <= 0:
                break
            chunk = pages[lo:lo + CHUNK_PAGES]
            where = query_nodes(task, chunk)
            here = where == c.to_node
            local += int(here.sum())
            absent = where == -errno.ENOENT  # never touched: nothing to move
            todo = chunk[~here & ~absent & (where >= 0)]
            _count_failures(act.pages_failed, where[(where < 0) & ~absent])
            todo = todo[:left]
            if todo.size == 0:
                continue
            if params.dry_run:
                n = todo.size
            else:
                st = move_pages(task, todo, c.to_node)
                n = int((st == c.to_node).sum())
                _count_failures(act.pages_failed, st)
            moved += n
            left -= todo.size
        act.pages_moved += moved
        act.pages_local += local
        act.regions.append({"start": c.start, "end": c.end, "to_node": c.to_node,
                            "hits": c.hits, "share": round(c.share, 3), "pages_moved": moved})
    return act
