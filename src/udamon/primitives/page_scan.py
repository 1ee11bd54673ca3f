"""PAGEMAP_SCAN over whole spans: which pages are resident, which were written.

The controlled loop (udamon.primitives.uffd_loop) asks about a few armed pages;
the dirty-rate estimator and the KSM advisor ask about whole mappings: the
sampling frame (resident pages), and in the exact mode every page written since
the last scan, which the same ioctl write-protects again atomically
(``PM_SCAN_WP_MATCHING``), so that no write falls between two windows.

A scan covers at most 128 MiB at a time (FACTS.md: ``walk_end`` came back early
on a 256 MiB range); when the result vector fills up, the scan goes on from
``walk_end`` (everything before it was reported, and protected when asked).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import numpy as np

from udamon.primitives.uffd_abi import (
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_WRITTEN,
    PAGEMAP_SCAN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    SCAN_CHUNK,
    UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_WP,
    VEC_LEN,
    PmScanArg,
    ioctl_ptr,
)
from udamon.primitives.uffd_loop import MmGone

PAGE = 4096


class SpanScanner:
    """PAGEMAP_SCAN of spans with one reused argument and result vector."""

    def __init__(self, vec_len: int = VEC_LEN) -> None:
        self._arg = PmScanArg()
        self._vec = np.zeros((vec_len, 3), dtype=np.uint64)
        self.calls = 0

    def _walk(self, fd: int, starts: np.ndarray, ends: np.ndarray, cat: int, anyof: int,
              ret: int, flags: int):
        """Yield each filled part of the result vector (a view, valid until the next
        one), and -1 for each span that failed (EPERM/EINVAL)."""
        arg, vec = self._arg, self._vec
        for lo, hi in zip(np.asarray(starts).tolist(), np.asarray(ends).tolist(), strict=True):
            ok = True
            while lo < hi and ok:
                end = min(hi, lo + SCAN_CHUNK)
                cur = lo
                while cur < end:
                    arg.size = 96
                    arg.flags = flags
                    arg.start = cur
                    arg.end = end
                    arg.walk_end = 0
                    arg.vec = vec.ctypes.data
                    arg.vec_len = vec.shape[0]
                    arg.max_pages = 0
                    arg.category_inverted = 0
                    arg.category_mask = cat
                    arg.category_anyof_mask = anyof
                    arg.return_mask = ret
                    n = ioctl_ptr(fd, PAGEMAP_SCAN, arg)
                    self.calls += 1
                    if n < 0:
                        if n == -errno.ESRCH:
                            raise MmGone()
                        yield -1
                        ok = False
                        break
                    if n:
                        yield vec[:n]
                    if n < vec.shape[0]:
                        break  # all of [cur, end) reported: ignore walk_end (FACTS.md)
                    nxt = int(arg.walk_end)
                    if nxt <= cur:
                        break
                    cur = nxt
                lo = end

    def scan(self, fd: int, starts: np.ndarray, ends: np.ndarray, *, cat: int = 0,
             anyof: int = 0, ret: int = 0, flags: int = 0) -> tuple[np.ndarray, int]:
        """Runs ``[start, end, categories]`` (uint64, sorted) of the pages of the spans
        that match; and how many spans failed (EPERM/EINVAL: the VMA changed or is not
        registered -- that span is not observed).  Raises MmGone when the mm is gone."""
        out: list[np.ndarray] = []
        failed = 0
        for part in self._walk(fd, starts, ends, cat, anyof, ret, flags):
            if isinstance(part, int):
                failed += 1
            else:
                out.append(part.copy())
        if not out:
            return np.zeros((0, 3), dtype=np.uint64), failed
        return np.concatenate(out), failed

    def protect_written_resident(self, fd: int, starts: np.ndarray, ends: np.ndarray
                                 ) -> int:
        """Write-protect the present pages of the spans that are not protected, in the
        walk that finds them (``PM_SCAN_WP_MATCHING``; holes get no marker); returns how
        many.  The runs are counted, not kept: memory stays flat however fragmented the
        pattern.  Raises MmGone when the mm is gone."""
        pages = 0
        for part in self._walk(fd, starts, ends, PAGE_IS_PRESENT | PAGE_IS_WRITTEN, 0,
                               PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC):
            if not isinstance(part, int):
                pages += pages_in(part[:, 0], part[:, 1])
        return pages

    def resident(self, fd: int, starts: np.ndarray, ends: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, int]:
        """Runs ``(lo, hi)`` of resident pages that hold memory of their own: present and
        not the shared zero page (a read of untouched anonymous memory maps it; it is
        no memory to send or merge).  Third value: spans not observed."""
        runs, failed = self.scan(fd, starts, ends, anyof=PAGE_IS_PRESENT,
                                 ret=PAGE_IS_PRESENT | PAGE_IS_PFNZERO)
        keep = (runs[:, 2] & np.uint64(PAGE_IS_PFNZERO)) == 0
        return runs[keep, 0], runs[keep, 1], failed

    def written(self, fd: int, starts: np.ndarray, ends: np.ndarray, *,
                reprotect: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
        """Runs ``(lo, hi)`` of the pages written since they were write-protected (and,
        with ``reprotect``, protected again in the same walk).  The spans must be
        registered for async write-protect and protected as a whole first: a page
        never protected reads as written."""
        flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if reprotect else 0)
        runs, failed = self.scan(fd, starts, ends, cat=PAGE_IS_WRITTEN, ret=PAGE_IS_WRITTEN,
                                 flags=flags)
        return runs[:, 0], runs[:, 1], failed


def protect_spans(uffd: int, starts: np.ndarray, ends: np.ndarray, *,
                  cmd: int = UFFDIO_WRITEPROTECT,
                  flag: int = UFFDIO_WRITEPROTECT_MODE_WP) -> np.ndarray:
    """Write-protect whole spans (holes too, with ``UFFD_FEATURE_WP_UNPOPULATED``), or
    with ``cmd``/``flag`` another mode's protection; returns which succeeded.  Raises
    MmGone when the mm is gone."""
    buf = bytearray(24)
    lo_l = np.asarray(starts).tolist()
    hi_l = np.asarray(ends).tolist()
    ok = np.ones(len(lo_l), dtype=bool)
    for i, (lo, hi) in enumerate(zip(lo_l, hi_l, strict=True)):
        struct.pack_into("<QQQ", buf, 0, lo, hi - lo, flag)
        try:
            fcntl.ioctl(uffd, cmd, buf)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise MmGone() from None
            ok[i] = False
    return ok


def pages_in(lo: np.ndarray, hi: np.ndarray) -> int:
    """Pages in the runs."""
    if lo.size == 0:
        return 0
    return int(((hi - lo) // np.uint64(PAGE)).sum())


def intersect(alo: np.ndarray, ahi: np.ndarray, blo: np.ndarray, bhi: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The intersection of two sorted lists of disjoint spans."""
    a = np.stack((np.asarray(alo, np.uint64), np.asarray(ahi, np.uint64)), axis=1)
    b = np.stack((np.asarray(blo, np.uint64), np.asarray(bhi, np.uint64)), axis=1)
    out_lo: list[int] = []
    out_hi: list[int] = []
    i = j = 0
    al, bl = a.tolist(), b.tolist()
    while i < len(al) and j < len(bl):
        lo = max(al[i][0], bl[j][0])
        hi = min(al[i][1], bl[j][1])
        if lo < hi:
            out_lo.append(lo)
            out_hi.append(hi)
        if al[i][1] < bl[j][1]:
            i += 1
        else:
            j += 1
    return np.asarray(out_lo, dtype=np.uint64), np.asarray(out_hi, dtype=np.uint64)


def page_addresses(lo: np.ndarray, hi: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The addresses of pages number ``index`` (sorted, 0-based) counted over the runs."""
    sizes = ((hi - lo) // np.uint64(PAGE)).astype(np.int64)
    first = np.concatenate(([0], np.cumsum(sizes)[:-1])) if sizes.size else sizes
    run = np.searchsorted(first, index, side="right") - 1
    return lo[run] + (index - first[run]).astype(np.uint64) * np.uint64(PAGE)


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
