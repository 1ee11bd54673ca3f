"""The controlled sampling loop of wp and rwp: arm, wait, check, once per sampling interval.

This is the part of udamon that runs every 5 ms, so it is kept apart from the
rest of the primitive (attaching, VMAs, attribution) and has two implementations
with one interface: the C extension ``udamon.primitives._uffd_loop`` (built by
``pip install .``) and this module's pure-Python fallback, used when the
extension is missing (a one-line notice says so).  bench/analysis.md has the
numbers behind the choice.

``run_window`` runs the turns of one aggregation interval for every target:
turn ``t`` protects the pages ``pages[t]`` (one per region, chosen by the core)
at ``tick0 + t * sample``, sleeps until the turn ends -- polling the targets'
pidfds and the session's stop fd, so an exit or a stop ends the window at once --
and then asks ``PAGEMAP_SCAN`` which armed pages were accessed.  Turns are never
skipped: as kdamond counts samples, not wall time, a turn that starts late still
lasts a whole sampling interval and the ones after it move (counted as late).  Each cell of a
target's ``state`` array (turns x regions) ends up as one of the codes below.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from udamon.native import load as load_native
from udamon.primitives.uffd_abi import (
    PAGEMAP_SCAN,
    SCAN_CHUNK,
    SCAN_JOIN,
    VEC_LEN,
    Mode,
    PmScanArg,
    ioctl_ptr,
)

# state codes of a (turn, region) sample
NOT_ARMED = 0  # the page is outside every registered VMA (or the turn was skipped)
ARMED = 1  # protected, not accessed before the turn ended
HIT = 2  # protected and accessed
UNPOPULATED = 3  # rwp: no page there when checked -- nothing could be observed
FAILED = 4  # the protection ioctl refused (the VMA changed under us)

# why a window ended
DONE, STOPPED, EXITED, MM_GONE = "done", "stopped", "exited", "mm-gone"


class MmGone(Exception):
    """The mm a uffd or pagemap fd belongs to is gone (the process exited or exec'd)."""


@dataclass
class WindowTarget:
    """One target's share of a window: its fds, the sampled pages and the results."""

    uffd: int
    pagemap: int
    pidfd: int  # -1: exits are noticed by the caller instead
    pages: np.ndarray  # (turns, regions) uint64, page-aligned sampling addresses
    spans_lo: np.ndarray  # registered VMAs, sorted, uint64
    spans_hi: np.ndarray
    state: np.ndarray = field(init=False)  # (turns, regions) uint8, the codes above
    gone: str = ""  # "", EXITED or MM_GONE

    def __post_init__(self) -> None:
        self.pages = np.ascontiguousarray(self.pages, dtype=np.uint64)
        self.state = np.zeros(self.pages.shape, dtype=np.uint8)


@dataclass
class WindowStats:
    turns: int = 0  # turns run
    late: int = 0  # turns armed more than a tenth of an interval after their tick


def inside(pages: np.ndarray, lo: np.ndarray, hi: np.ndarray, page_size: int) -> np.ndarray:
    """Which pages lie wholly inside one of the sorted spans [lo, hi)."""
    if lo.size == 0:
        return np.zeros(pages.size, dtype=bool)
    i = np.searchsorted(lo, pages, side="right") - 1
    ok = i >= 0
    i = np.maximum(i, 0)
    return ok & (pages >= lo[i]) & (pages + np.uint64(page_size) <= hi[i])


def protect(fd: int, mode: Mode, pages: np.ndarray, page_size: int) -> np.ndarray:
    """Protect the sorted, distinct ``pages`` (runs of adjacent pages in one ioctl each);
    returns which succeeded.  Raises MmGone when the target's mm is gone."""
    ok = np.ones(pages.size, dtype=bool)
    if pages.size == 0:
        return ok
    brk = np.flatnonzero(np.diff(pages) != np.uint64(page_size)) + 1
    run_lo = np.concatenate(([0], brk)).tolist()
    run_hi = np.concatenate((brk, [pages.size])).tolist()
    starts = pages[run_lo].tolist()
    buf = bytearray(24)
    cmd, flag = mode.protect_cmd, mode.protect_flag
    for a, b, start in zip(run_lo, run_hi, starts, strict=True):
        struct.pack_into("<QQQ", buf, 0, start, (b - a) * page_size, flag)
        try:
            fcntl.ioctl(fd, cmd, buf)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise MmGone() from None
            ok[a:b] = False  # the VMA went away or changed: not armed
    return ok


class Scanner:
    """PAGEMAP_SCAN over clusters of armed pages, with one reused argument and vector."""

    def __init__(self) -> None:
        self._arg = PmScanArg()
        self._vec = np.zeros((VEC_LEN, 3), dtype=np.uint64)

    def _scan_range(self, fd: int, lo: int, hi: int, masks: tuple[int, int, int],
                    out: list[np.ndarray]) -> None:
        arg, vec = self._arg, self._vec
        while lo < hi:
            arg.size = 96
            arg.flags = 0
            arg.start = lo
            arg.end = hi
            arg.walk_end = 0
            arg.vec = vec.ctypes.data
            arg.vec_len = VEC_LEN
            arg.max_pages = 0
            arg.category_inverted = 0
            arg.category_mask, arg.category_anyof_mask, arg.return_mask = masks
            n = ioctl_ptr(fd, PAGEMAP_SCAN, arg)
            if n < 0:
                if n == -errno.ESRCH:
                    raise MmGone()
                raise OSError(-n, f"PAGEMAP_SCAN: {os.strerror(-n)}")
            if n:
                out.append(vec[:n].copy())
            if n < VEC_LEN:
                return  # everything in [lo, hi) was reported: ignore walk_end (FACTS.md)
            nxt = int(arg.walk_end)
            if nxt <= lo:
                return
            lo = nxt

    def categories(self, fd: int, pages: np.ndarray, masks: tuple[int, int, int],
                   page_size: int) -> np.ndarray:
        """The categories PAGEMAP_SCAN returns for each sorted page (0: not reported):
        one scan per cluster of nearby pages, so the cost follows the number of
        regions, not the size of the address space they span."""
        out = np.zeros(pages.size, dtype=np.uint64)
        if pages.size == 0:
            return out
        runs: list[np.ndarray] = []
        brk = np.flatnonzero(np.diff(pages) > np.uint64(SCAN_JOIN)) + 1
        los = pages[np.concatenate(([0], brk))].tolist()
        his = (pages[np.concatenate((brk - 1, [pages.size - 1]))] + np.uint64(page_size)).tolist()
        for lo, hi in zip(los, his, strict=True):
            while lo < hi:
                end = min(hi, lo + SCAN_CHUNK)
                self._scan_range(fd, lo, end, masks, runs)
                lo = end
        if not runs:
            return out
        r = np.concatenate(runs)
        order = np.argsort(r[:, 0], kind="stable")
        starts, ends, cats = r[order, 0], r[order, 1], r[order, 2]
        k = np.searchsorted(starts, pages, side="right") - 1
        hit = k >= 0
        k = np.maximum(k, 0)
        hit &= (pages >= starts[k]) & (pages < ends[k])
        out[hit] = cats[k[hit]]
        return out


def classify(mode: Mode, cats: np.ndarray) -> np.ndarray:
    """Scan categories of armed pages -> HIT / ARMED / UNPOPULATED."""
    st = np.where((cats & np.uint64(mode.hit)) != 0, HIT, ARMED).astype(np.uint8)
    if mode.populated:
        st[(cats & np.uint64(mode.populated)) == 0] = UNPOPULATED
    return st


def _wait_until(deadline_ns: int, poller: select.poll | None) -> list[int]:
    """Sleep until ``deadline_ns`` (CLOCK_MONOTONIC) or an fd becomes readable;
    returns the readable fds."""
    while True:
        left = deadline_ns - time.monotonic_ns()
        if left <= 0:
            return []
        if poller is None:
            time.sleep(left / 1e9)
            return []
        ev = poller.poll(-(-left // 1_000_000))  # ms, rounded up
        if ev:
            return [fd for fd, _ in ev]


_native = load_native("udamon.primitives._uffd_loop")
_WHY = {0: DONE, 1: STOPPED, 2: EXITED, 3: MM_GONE, 4: STOPPED}
_GONE = {0: "", 1: EXITED, 2: MM_GONE}
_GONE_CODE = {v: k for k, v in _GONE.items()}


def native() -> bool:
    """Whether run_window uses the C loop."""
    return _native is not None


def run_window(targets: list[WindowTarget], mode: Mode, tick0_ns: int, sample_ns: int,
               first: int, stop_fd: int, arm_ns: np.ndarray, scan_ns: np.ndarray,
               stats: WindowStats, page_size: int = 4096,
               scanner: Scanner | None = None, join: int = SCAN_JOIN,
               rt_priority: int = 0) -> tuple[int, str]:
    """Run turns ``first``.. of the window; returns (next turn, why).  ``join``: the
    C loop's scan clustering (uffd_abi.SCAN_JOIN; other values for the benchmark);
    ``rt_priority`` > 0: the C loop runs its turns as SCHED_FIFO at that priority."""
    if _native is not None and targets:
        cat, anyof, ret = mode.scan_masks
        tup = [(tg.uffd, tg.pagemap, tg.pidfd, tg.pages, tg.spans_lo, tg.spans_hi, tg.state,
                _GONE_CODE[tg.gone]) for tg in targets]
        nxt, why, late, run, gone = _native.run_window(
            tup, protect_cmd=mode.protect_cmd, protect_flag=mode.protect_flag,
            cat_mask=cat, anyof_mask=anyof, ret_mask=ret, hit=mode.hit,
            populated=mode.populated, tick0_ns=tick0_ns, sample_ns=sample_ns, first=first,
            turns=targets[0].pages.shape[0], stop_fd=stop_fd, arm_ns=arm_ns, scan_ns=scan_ns,
            page_size=page_size, join=join, chunk=SCAN_CHUNK, rt_priority=rt_priority)
        stats.late += late
        stats.turns += run
        for tg, g in zip(targets, gone, strict=True):
            tg.gone = _GONE[g]
        return nxt, _WHY[why]
    return run_window_py(targets, mode, tick0_ns, sample_ns, first, stop_fd, arm_ns, scan_ns,
                         stats, page_size, scanner)


def run_window_py(targets: list[WindowTarget], mode: Mode, tick0_ns: int, sample_ns: int,
                  first: int, stop_fd: int, arm_ns: np.ndarray, scan_ns: np.ndarray,
                  stats: WindowStats, page_size: int = 4096,
                  scanner: Scanner | None = None) -> tuple[int, str]:
    """The pure-Python loop (same algorithm as _uffd_loop.c)."""
    scanner = scanner or Scanner()
    n_turns = targets[0].pages.shape[0] if targets else 0
    masks = mode.scan_masks
    fds = [stop_fd] if stop_fd >= 0 else []
    fds += [tg.pidfd for tg in targets if tg.pidfd >= 0 and not tg.gone]
    poller = None
    if fds:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
    late_ns = sample_ns // 10
    prev_end = 0
    for t in range(first, n_turns):
        # back to back: a late turn starts now and still lasts a whole interval
        tick = max(tick0_ns + t * sample_ns, prev_end)
        now = time.monotonic_ns()
        if now - tick > late_ns:
            stats.late += 1
        end = prev_end = max(tick, now) + sample_ns
        arm_ns[t] = now  # before protecting: a fault cannot come earlier
        armed: list[np.ndarray] = []
        for tg in targets:
            sel = np.zeros(0, dtype=np.intp)
            if not tg.gone:
                pages = tg.pages[t]
                sel = np.flatnonzero(inside(pages, tg.spans_lo, tg.spans_hi, page_size))
                try:
                    ok = protect(tg.uffd, mode, pages[sel], page_size)
                except MmGone:
                    tg.gone = MM_GONE
                    sel = sel[:0]
                else:
                    tg.state[t, sel[~ok]] = FAILED
                    sel = sel[ok]
                    tg.state[t, sel] = ARMED
            armed.append(sel)
        ready = _wait_until(end, poller)
        for tg, sel in zip(targets, armed, strict=True):
            if tg.gone or sel.size == 0:
                continue
            try:
                cats = scanner.categories(tg.pagemap, tg.pages[t, sel], masks, page_size)
            except (MmGone, OSError) as e:
                # the mm is gone (exit or exec); another failure: not observed this turn
                tg.gone = MM_GONE if isinstance(e, MmGone) else tg.gone
                tg.state[t, sel] = NOT_ARMED
                continue
            tg.state[t, sel] = classify(mode, cats)
        scan_ns[t] = time.monotonic_ns()
        stats.turns += 1
        why = _why(targets, ready, stop_fd)
        if why != DONE:
            return t + 1, why
    return n_turns, DONE


def _why(targets: list[WindowTarget], ready: list[int], stop_fd: int) -> str:
    for tg in targets:
        if tg.pidfd >= 0 and tg.pidfd in ready and not tg.gone:
            tg.gone = EXITED
    if any(tg.gone == MM_GONE for tg in targets):
        return MM_GONE
    if any(tg.gone == EXITED for tg in targets) and ready:
        return EXITED
    if stop_fd >= 0 and stop_fd in ready:
        return STOPPED
    return DONE

