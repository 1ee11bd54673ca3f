"""The dirty-rate estimator: distinct pages dirtied per window, QEMU's definition.

QEMU's ``calc-dirty-rate`` (page-sampling mode) hashes a random sample of each
RAM block's pages (512 per GiB by default), waits ``calc-time`` and counts the
sampled pages whose content changed: the dirty rate is that share of the
memory per second -- distinct pages dirtied in the window, however often each
was written.  This estimator asks the same question with the controlled write
primitive instead of hashes (the wp sampler of udamon.primitives.uffd does the
attaching and the registration; nothing is copied from it):

* per target and *part* (a VMM's guest RAM, the VMM's own memory, or a plain
  process's memory), the sampling frame is the part's resident pages that hold
  memory of their own (present, not the shared zero page: ``PAGEMAP_SCAN``);
* at the start of each window a uniform random sample of them is
  write-protected (async userfaultfd: the target never blocks), at its end one
  ``PAGEMAP_SCAN`` says which were written; pages that became resident during
  the window are counted as dirtied (a first touch of anonymous memory that
  makes a page of its own is a write);
* the sample is sized like QEMU's (``sample_pages`` per GiB of the frame, at
  least ``min_sample``) in the first window, then as large as the share seen
  so far needs for a 3 % relative standard error per window (capped); a sample
  that would cover a quarter of the frame or more is replaced by the exact
  count, which is cheaper then;
* the **exact** mode counts every page: the part's mappings are write-protected
  whole, and each window's end is one ``PAGEMAP_SCAN`` with
  ``PM_SCAN_WP_MATCHING`` that returns the pages written and protects them
  again in the same walk -- QEMU's dirty-bitmap mode, for user space.

Each window yields, per part: the frame, the sample, the dirtied pages and the
new ones; udamon.report.dirty_rate turns windows into a rate with an interval.
Cost on the target: one minor fault (~0.7 us, FACTS.md) for the first write to
each protected page per window, and a transparent huge page whose 4 KiB page is
protected and written is split (the data stay; khugepaged may collapse it).
"""

from __future__ import annotations

import math
import select
import time
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import RuntimeFailure
from udamon.primitives import uffd_loop
from udamon.primitives.page_scan import (
    PAGE,
    SpanScanner,
    intersect,
    page_addresses,
    pages_in,
    protect_spans,
)
from udamon.primitives.uffd import Registered, WpPrimitive
from udamon.primitives.uffd_abi import PAGE_IS_WRITTEN, WP
from udamon.primitives.uffd_loop import MmGone

QEMU_SAMPLE_PAGES = 512  # per GiB: QEMU's DIRTYRATE_DEFAULT_SAMPLE_PAGES
MIN_SAMPLE = 256
MAX_SAMPLE = 65536
REL_SE = 0.03  # aimed-at relative standard error of one window's share
DENSE = 0.25  # a sample this large a share of the frame: count exactly instead
GIB = 1 << 30


@dataclass(frozen=True)
class PartSpec:
    """A part of a target: ``spans`` (sorted, disjoint), or None for every registered
    mapping no other part of the target claims."""

    name: str
    spans: tuple[tuple[int, int], ...] | None = None


@dataclass
class PartWindow:
    name: str
    population: int  # resident pages of the frame at the window's start
    sampled: int  # pages protected (== population when exact)
    dirtied: int  # of them written in the window (exact: every page written)
    new_pages: int = 0  # pages that became resident (sample mode: counted as dirtied)
    exact: bool = False
    unobserved: int = 0  # spans whose protection or scan failed (VMA changed)
    window_ns: int = 0  # how long its pages were exposed: protection (or, exact and
    # protected since the last window, the last check) to this check

    def to_dict(self) -> dict:
        return {"name": self.name, "window_ns": self.window_ns, "population": self.population,
                "sampled": self.sampled, "dirtied": self.dirtied, "new_pages": self.new_pages,
                "exact": self.exact, "unobserved": self.unobserved}

    @classmethod
    def from_dict(cls, d: dict) -> PartWindow:
        return cls(str(d["name"]), int(d["population"]), int(d["sampled"]),
                   int(d["dirtied"]), int(d.get("new_pages", 0)), bool(d.get("exact")),
                   int(d.get("unobserved", 0)), int(d.get("window_ns", 0)))


@dataclass
class TargetWindow:
    pid: int
    start_ns: int  # the window: from protecting (CLOCK_MONOTONIC) ..
    end_ns: int  # .. to checking; each part has its own exposure (PartWindow.window_ns)
    parts: list[PartWindow]

    @property
    def window_ns(self) -> int:
        return max(self.end_ns - self.start_ns, 1)


@dataclass
class _PartState:
    hits: int = 0  # pooled over the windows so far
    looked: int = 0
    armed: set[tuple[int, int]] = field(default_factory=set)  # exact: spans kept protected
    # this window
    lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    population: int = 0
    pages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    exact: bool = False
    unobserved: int = 0
    start_ns: int = 0  # when its pages' exposure began
    last_check_ns: int = 0  # when the previous window's check of the part ran


def sample_size(population: int, hits: int, looked: int, *, per_gib: int = QEMU_SAMPLE_PAGES,
                min_sample: int = MIN_SAMPLE, max_sample: int = MAX_SAMPLE,
                rel_se: float = REL_SE) -> int:
    """Pages to sample from a frame of ``population`` pages, given ``hits`` dirtied of
    ``looked`` sampled so far (QEMU's per-GiB size until something was seen; none
    dirtied: the share's 95 % upper bound, 3 / looked, sizes the next sample)."""
    if population <= 0:
        return 0
    base = max(min_sample, math.ceil(per_gib * population * PAGE / GIB))
    n = base
    if looked > 0:
        p = hits / looked if hits else 3.0 / looked
        p = min(max(p, 1e-9), 1.0)
        need = (1 - p) / (p * rel_se * rel_se)
        need = need / (1 + need / population)  # sampling without replacement
        n = max(base, math.ceil(need))
    return min(n, max_sample, population)


class DirtySampler:
    """Windows of dirtied-page counts for several targets at once (see the module)."""

    def __init__(self, parts: dict[int, list[PartSpec]], *, window_ns: int = 1_000_000_000,
                 exact: bool = False, per_gib: int = QEMU_SAMPLE_PAGES,
                 min_sample: int = MIN_SAMPLE, max_sample: int = MAX_SAMPLE,
                 seed: int | None = None) -> None:
        if window_ns <= 0:
            raise ValueError("the window must be positive")
        self.parts = {int(p): list(v) for p, v in parts.items()}
        self.window_ns = window_ns
        self.exact = exact
        self.per_gib = per_gib
        self.min_sample = min_sample
        self.max_sample = max_sample
        self.rng = np.random.default_rng(seed)
        self.prim = WpPrimitive(sorted(self.parts), attribute=False,
                                protect_resident=False)
        self.scanner = SpanScanner()
        self.page_scanner = uffd_loop.Scanner()
        self._state: dict[tuple[int, str], _PartState] = {}
        self._gone: set[int] = set()
        self.protect_s = 0.0  # udamon's time spent protecting and checking
        self.check_s = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.prim.start()

    def stop(self) -> None:
        self.prim.stop()  # closing the uffd drops every protection

    def exited(self) -> list[int]:
        return sorted(set(self.prim.exited()) | self._gone)

    def notes(self) -> list[str]:
        return list(self.prim.stats().notes)

    # ------------------------------------------------------------------ one window

    def _frames(self, pid: int, reg: Registered) -> list[tuple[PartSpec, np.ndarray, np.ndarray]]:
        """Each part's spans within the registered mappings."""
        specs = self.parts[pid]
        out = []
        claimed_lo: list[int] = []
        claimed_hi: list[int] = []
        for spec in specs:
            if spec.spans is None:
                continue
            lo = np.asarray([s for s, _ in spec.spans], dtype=np.uint64)
            hi = np.asarray([e for _, e in spec.spans], dtype=np.uint64)
            a, b = intersect(lo, hi, reg.starts, reg.ends)
            out.append((spec, a, b))
            claimed_lo += [s for s, _ in spec.spans]
            claimed_hi += [e for _, e in spec.spans]
        rest = [s for s in specs if s.spans is None]
        if rest:
            a, b = _minus(reg.starts, reg.ends, claimed_lo, claimed_hi)
            out.append((rest[0], a, b))
        return out

    def _arm(self, pid: int, reg: Registered) -> None:
        for spec, lo, hi in self._frames(pid, reg):
            st = self._state.setdefault((pid, spec.name), _PartState())
            rlo, rhi, failed = self.scanner.resident(reg.pagemap, lo, hi)
            st.lo, st.hi, st.population, st.unobserved = lo, hi, pages_in(rlo, rhi), failed
            n = self.max_sample + 1 if self.exact else sample_size(
                st.population, st.hits, st.looked, per_gib=self.per_gib,
                min_sample=self.min_sample, max_sample=self.max_sample)
            st.exact = self.exact or n >= DENSE * st.population
            st.pages = np.zeros(0, np.uint64)
            t0 = time.monotonic_ns()
            if st.exact:
                keys = set(zip(lo.tolist(), hi.tolist(), strict=True))
                new = sorted(keys - st.armed)
                if new:
                    ok = protect_spans(reg.uffd, np.asarray([a for a, _ in new], np.uint64),
                                       np.asarray([b for _, b in new], np.uint64))
                    st.unobserved += int(np.count_nonzero(~ok))
                    keys -= {k for k, good in zip(new, ok.tolist(), strict=True) if not good}
                # protected since the last check (PM_SCAN_WP_MATCHING): exposed since then
                continuous = not new and st.last_check_ns > 0
                st.armed = keys
                st.start_ns = st.last_check_ns if continuous else (t0 + time.monotonic_ns()) // 2
                continue
            st.armed = set()
            if n > 0:
                idx = np.sort(self.rng.choice(st.population, size=n, replace=False))
                pages = page_addresses(rlo, rhi, idx.astype(np.int64))
                ok = uffd_loop.protect(reg.uffd, WP, pages, PAGE)
                st.pages = pages[ok]
                st.unobserved += int(np.count_nonzero(~ok))
            st.start_ns = (t0 + time.monotonic_ns()) // 2

    def _check(self, pid: int, reg: Registered) -> list[PartWindow]:
        out = []
        for spec in self.parts[pid]:
            st = self._state.get((pid, spec.name))
            if st is None:
                continue
            t0 = time.monotonic_ns()
            if st.exact:
                keys = sorted(st.armed)
                lo = np.asarray([a for a, _ in keys], np.uint64)
                hi = np.asarray([b for _, b in keys], np.uint64)
                wlo, whi, failed = self.scanner.written(reg.pagemap, lo, hi, reprotect=True)
                end = (t0 + time.monotonic_ns()) // 2
                d = pages_in(wlo, whi)
                pw = PartWindow(spec.name, st.population, st.population, d, 0, True,
                                st.unobserved + failed, max(end - st.start_ns, 1))
                st.hits += min(d, st.population)
                st.looked += st.population
                st.last_check_ns = end if not failed else 0
            else:
                cats = self.page_scanner.categories(reg.pagemap, st.pages, WP.scan_masks, PAGE)
                end = (t0 + time.monotonic_ns()) // 2
                d = int(np.count_nonzero(cats & np.uint64(PAGE_IS_WRITTEN)))
                rlo, rhi, failed = self.scanner.resident(reg.pagemap, st.lo, st.hi)
                grown = max(0, pages_in(rlo, rhi) - st.population)
                pw = PartWindow(spec.name, st.population, int(st.pages.size), d, grown, False,
                                st.unobserved + failed, max(end - st.start_ns, 1))
                st.hits += d
                st.looked += int(st.pages.size)
                st.last_check_ns = 0
            out.append(pw)
        return out

    def window(self, stop_fd: int = -1) -> list[TargetWindow]:
        """Run one window for every live target; returns their counts (a target that
        exited or exec'd during the window is left out of this one)."""
        regs: dict[int, Registered] = {}
        armed_at: dict[int, tuple[int, int]] = {}
        self._gone |= set(self.prim.exited())
        t0 = time.perf_counter()
        for pid in sorted(self.parts):
            if pid in self._gone:
                continue
            reg = self.prim.registered(pid)
            if reg is None:
                self._gone.add(pid)
                continue
            a = time.monotonic_ns()
            try:
                self._arm(pid, reg)
            except MmGone:
                self.prim.lost_mm(pid)
                continue
            except OSError as e:
                raise RuntimeFailure(f"dirty rate: protecting pages of process {pid} failed: "
                                     f"{e.strerror}") from None
            regs[pid] = reg
            armed_at[pid] = (a, time.monotonic_ns())
        self.protect_s += time.perf_counter() - t0
        if not regs:
            return []
        deadline = max(b for _, b in armed_at.values()) + self.window_ns
        # a target that exits or a stop ends the window early: it is then shorter, and
        # what it counted is still the distinct pages dirtied in it
        _wait(deadline, [r.pidfd for r in regs.values()], stop_fd)
        out = []
        t1 = time.perf_counter()
        for pid, reg in regs.items():
            c0 = time.monotonic_ns()
            try:
                parts = self._check(pid, reg)
            except MmGone:
                self.prim.lost_mm(pid)
                continue
            except OSError as e:
                raise RuntimeFailure(f"dirty rate: scanning process {pid} failed: "
                                     f"{e.strerror}") from None
            c1 = time.monotonic_ns()
            a0, a1 = armed_at[pid]
            out.append(TargetWindow(pid, (a0 + a1) // 2, (c0 + c1) // 2, parts))
        self.check_s += time.perf_counter() - t1
        return out


def _minus(lo: np.ndarray, hi: np.ndarray, cut_lo: list[int], cut_hi: list[int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """The spans [lo, hi) minus the (sorted, disjoint) cuts."""
    cuts = sorted(zip(cut_lo, cut_hi, strict=True))
    out_lo: list[int] = []
    out_hi: list[int] = []
    for a, b in zip(np.asarray(lo).tolist(), np.asarray(hi).tolist(), strict=True):
        cur = a
        for c, d in cuts:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out_lo.append(cur)
                out_hi.append(c)
            cur = max(cur, d)
        if cur < b:
            out_lo.append(cur)
            out_hi.append(b)
    return np.asarray(out_lo, np.uint64), np.asarray(out_hi, np.uint64)


def _wait(deadline_ns: int, pidfds: list[int], stop_fd: int) -> bool:
    """Sleep until the deadline; True when a target exited or ``stop_fd`` became
    readable first."""
    fds = [fd for fd in (*pidfds, stop_fd) if fd >= 0]
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while True:
        left = deadline_ns - time.monotonic_ns()
        if left <= 0:
            return False
        if poller.poll(-(-left // 1_000_000)):
            return True
