"""Which NUMA node holds a process's pages: move_pages(2) in query mode.

With ``nodes == NULL`` move_pages moves nothing and fills ``status`` with the
node of each page, or a negative errno (-ENOENT: not present, -EFAULT: not
mapped).  Used to sample a few pages per region each aggregation, so that
NUMA reports can compare who accesses a region with where it lives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import numpy as np

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


def sample_region_nodes(pid: int, starts: np.ndarray, ends: np.ndarray,
                        rng: np.random.Generator, per_region: int = 2,
                        page: int = 4096) -> list[dict[str, int]] | None:
    """For each region, ``{"<node>": pages}`` over ``per_region`` random pages;
    pages that are not present are left out.  None when the query is not possible."""
    n = starts.size
    if n == 0:
        return []
    sz = (ends - starts).astype(np.float64)
    off = (rng.random((per_region, n)) * sz).astype(np.uint64)
    addrs = ((starts + off) & ~np.uint64(page - 1)).reshape(-1)
    try:
        status = query_nodes(pid, addrs).reshape(per_region, n)
    except OSError:
        return None
    # pages per (region, node) in one bincount
    ok = status >= 0
    if not ok.any():
        return [{} for _ in range(n)]
    top = int(status.max()) + 1
    region = np.broadcast_to(np.arange(n), status.shape)
    counts = np.bincount((region[ok] * top + status[ok]).ravel(),
                         minlength=n * top).reshape(n, top)
    nz_r, nz_n = np.nonzero(counts)
    vals = counts[nz_r, nz_n].tolist()
    out: list[dict[str, int]] = [{} for _ in range(n)]
    for r, node, c in zip(nz_r.tolist(), nz_n.tolist(), vals, strict=True):
        out[r][str(node)] = c
    return out
