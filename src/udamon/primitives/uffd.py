"""wp and rwp: DAMON's controlled sampling with an async userfaultfd injected into the target.

One sampler, two modes (udamon.primitives.uffd_abi): ``wp`` write-protects the
sampled pages and sees writes (Linux 6.7+); ``rwp`` read-write-protects them
and sees every access, reads included (Linux 7.3+, ``CONFIG_USERFAULTFD_RWP``).

How it works (DESIGN.md "Primitives", FACTS.md "userfaultfd from outside"):

* ``start``: a ``userfaultfd`` is created inside each target by ptrace syscall
  injection in a helper process and taken with ``pidfd_getfd``
  (udamon.targets.inject); ``UFFDIO_API`` enables the mode's async feature
  (``WP_ASYNC`` or ``RWP|RWP_ASYNC``, after probing what the kernel has with a
  throwaway uffd) so the kernel resolves a first access to a protected page by
  itself: the target never blocks, even when udamon dies.  The target's
  eligible VMAs (anonymous private, and shmem) are registered while its
  threads are frozen (targets/freeze.py: a stale range would split a VMA).
* each aggregation interval the core picks one random page per region per
  sampling interval and ``sample_window`` runs those turns
  (udamon.primitives.uffd_loop): protect, sleep, ``PAGEMAP_SCAN``.  Only armed
  pages count: a page never protected reads as written/accessed.
* CPU, thread and (rwp) read or write come from the ``exceptions:page_fault_user``
  tracepoint sample of the same page in the same turn: the *first* access after
  protection (a read-modify-write shows as a read under rwp, as with hint).
  Accesses without a user fault (the kernel reading or writing for the target in
  a syscall, ``process_vm_writev``) are reported with cpu = tid = -1 (rwp: as
  reads).
* rwp can protect only *present* PTEs: an armed page that is not populated when
  checked cannot be observed; it is counted as such (never as accessed) and the
  record's notes say how many there were.  ``MADV_DONTNEED`` drops protection;
  pages are armed anew every interval anyway.  WP and RWP cannot share a VMA,
  so a second wp/rwp session on the same process is refused.
* ``stop``: closing the uffd unregisters every VMA and drops every protection
  (the kernel's ``userfaultfd_release``); a SIGKILLed udamon gets the same when
  the kernel closes its fds.

A target that execs is attached again (new mm, new uffd); one that cannot be
(seccomp after exec, ...) or exits is reported by ``exited()``; exits are seen
through pidfds, without reading /proc.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import select
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from udamon.arrays import sorted_unique
from udamon.errors import RuntimeFailure, TargetGone
from udamon.intake.reports import SOURCE_IDS, empty
from udamon.primitives import uffd_loop
from udamon.primitives.base import Primitive, PrimitiveStats, Window
from udamon.primitives.page_scan import SpanScanner, protect_spans
from udamon.primitives.uffd_abi import (
    PAGEMAP_SCAN,
    RWP,
    UFFDIO_REGISTER,
    WP,
    Mode,
    PmScanArg,
    ioctl_ptr,
    kernel_features,
    missing_feature,
    uffd_api,
)
from udamon.primitives.uffd_loop import HIT, MmGone, WindowStats, WindowTarget
from udamon.targets import inject
from udamon.targets.freeze import FreezeFailed, Freezer, release_stragglers
from udamon.targets.procmaps import Vma, is_alive, mm_path, read_vmas
from udamon.targets.topology import nodes_of

REFRESH_S = 1.0
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
SHMEM_PREFIXES = ("/dev/zero", "/SYSV", "/memfd:", "/dev/shm/", "[anon_shmem")
# x86 page-fault error code bits
PF_PRESENT, PF_WRITE, PF_USER = 0x1, 0x2, 0x4


def uffd_available(mode: Mode) -> tuple[bool, str]:
    """Whether ``mode`` can work here, and why not (or what it has)."""
    if platform.machine() != inject.ARCH:
        return False, (f"{mode.name} needs {inject.ARCH} for syscall injection "
                       f"(this is {platform.machine()})")
    try:
        feats = kernel_features()
    except OSError as e:
        return False, f"userfaultfd()/UFFDIO_API failed: {e.strerror}"
    why = missing_feature(mode, feats)
    if why:
        return False, why
    try:
        pm = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open /proc/self/pagemap: {e.strerror}"
    try:
        arg = PmScanArg(size=96)  # empty range: validates the ioctl only
        n = ioctl_ptr(pm, PAGEMAP_SCAN, arg)
        if n < 0:
            return False, f"PAGEMAP_SCAN ioctl unavailable ({os.strerror(-n)}; needs Linux 6.7+)"
    finally:
        os.close(pm)
    names = "WP_ASYNC" if mode is WP else "RWP, RWP_ASYNC"
    return True, f"userfaultfd features {feats:#x} ({names}), PAGEMAP_SCAN"


def wp_available() -> tuple[bool, str]:
    return uffd_available(WP)


def rwp_available() -> tuple[bool, str]:
    return uffd_available(RWP)


def ring_pages(faults_per_window: int, ncpus: int = 1, record_bytes: int = 80) -> int:
    """Perf ring pages per CPU that hold one window's worth of faults twice over (the
    tracer is read once per aggregation): a power of two from 256 (1 MiB) up to 1024,
    and at most 16 MiB over all CPUs.  What still overflows is counted as lost."""
    need = max(1, 2 * faults_per_window * record_bytes // 4096)
    cap = max(256, min(1024, (16 << 20) // 4096 // max(ncpus, 1)))
    pages = 256
    while pages < need and pages * 2 <= cap:
        pages *= 2
    return pages


@dataclass
class _Target:
    pid: int
    uffd: int = -1
    pagemap: int = -1
    pidfd: int = -1
    features: int = 0
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    registered: set[tuple[int, int]] = field(default_factory=set)
    busy: int = 0  # eligible VMAs another userfaultfd holds (EBUSY)
    last_refresh: float = 0.0
    armed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    arm_ns: int = 0
    gone: bool = False
    reattached: int = 0

    def close(self, *, pidfd: bool = False) -> None:
        for name in ("uffd", "pagemap", *(("pidfd",) if pidfd else ())):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
        self.armed = np.zeros(0, np.uint64)


@dataclass(frozen=True)
class Registered:
    """A live target's userfaultfd, pagemap fd, pidfd and registered spans (sorted
    uint64 ``starts``/``ends``): what an estimator that arms pages itself needs
    (udamon.primitives.dirty_sample, udamon.primitives.write_track)."""

    uffd: int
    pagemap: int
    pidfd: int
    starts: np.ndarray
    ends: np.ndarray


@dataclass
class _Counts:
    armed: int = 0
    hits: int = 0
    unpopulated: int = 0
    failed: int = 0
    outside: int = 0


class UffdPrimitive(Primitive):
    """The controlled uffd sampler; ``mode`` (WP or RWP) is what the subclasses set."""

    kind = "controlled"
    coverage = "controlled"
    mode: Mode = WP

    def __init__(self, pids: list[int], *, page_size: int = 4096, attribute: bool = True,
                 faults_per_window: int = 0, protect_resident: bool = True) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError("page_size must be a power of two")
        self.pids = sorted(set(int(p) for p in pids))
        self.page_size = page_size
        self._mask = np.uint64(~(page_size - 1) & ((1 << 64) - 1))
        self.attribute = attribute
        self.faults_per_window = faults_per_window
        self.protect_resident = protect_resident
        self.resident_protected = 0  # pages protected whole-mapping at registration
        self.resident_protect_s = 0.0
        self._targets: dict[int, _Target] = {}
        self._told_gone: set[int] = set()  # gone targets exited() has reported
        self._tracer = None
        self._guard = None
        self._notes: list[str] = []
        self._stopped = False
        self._started = False
        self._scanner = uffd_loop.Scanner()
        self._span_scanner = SpanScanner()
        self.unmatched = 0
        self.freezes = 0
        self.freeze_s = 0.0
        self.freeze_failures = 0
        self.counts = _Counts()
        self.loop = WindowStats()

    @property
    def arm_failures(self) -> int:
        return self.counts.failed

    # ------------------------------------------------------------ start

    def start(self, pids: list[int] | None = None) -> None:
        if self._started:
            return
        self._started = True
        if pids:
            self.pids = sorted(set(self.pids) | set(int(p) for p in pids))
        name = self.mode.name
        if not self.pids:
            raise RuntimeFailure(f"{name}: no target process")
        ok, why = uffd_available(self.mode)
        if not ok:
            raise RuntimeFailure(f"{name} primitive unavailable: {why}")
        try:
            for pid in self.pids:
                t = _Target(pid)
                self._targets[pid] = t
                self._attach(t)
            if self.attribute:
                self._start_tracer()
        except BaseException:
            self.stop()
            raise

    def _start_tracer(self) -> None:
        from udamon.system.perf_tracepoint import FaultTracer
        from udamon.system.sysctl_guard import (
            SettingsGuard,
            apply_tracefs,
            tracefs_needs_mount,
        )

        live = [p for p, t in self._targets.items() if not t.gone]
        if not live:
            return
        if self._guard is None and tracefs_needs_mount():
            # a guard only for the tracefs mount: its watchdog unmounts it on SIGKILL
            self._guard = SettingsGuard(handle_signals=False)
            self._notes.extend(apply_tracefs(self._guard))
        try:
            from udamon.system.perf_tracepoint import online_cpus

            pages = ring_pages(self.faults_per_window, len(online_cpus()))
            self._tracer = FaultTracer(live, pages_per_buffer=pages).open()
        except RuntimeFailure as e:
            self._tracer = None
            self._notes.append(f"{self.mode.name}: no CPU/thread attribution ({e})")

    def _attach(self, t: _Target) -> None:
        t.close()
        t.registered = set()
        t.busy = 0
        t.starts = t.ends = np.zeros(0, np.uint64)
        if t.pidfd < 0:
            try:
                t.pidfd = os.pidfd_open(t.pid)
            except ProcessLookupError:
                raise TargetGone(f"process {t.pid} exited while attaching") from None
            except OSError:
                t.pidfd = -1  # exits are then seen through /proc
        t.uffd = inject.inject_userfaultfd_isolated(t.pid)
        try:
            # UFFDIO_API works once per uffd: ask for everything wanted that exists.
            have = kernel_features()
            t.features = uffd_api(t.uffd, self.mode.required | (have & self.mode.optional))
            # (a live thread's when the main thread has exited: the fd keeps the mm)
            t.pagemap = os.open(mm_path(t.pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, TargetGone):
            t.close()
            raise TargetGone(f"process {t.pid} exited while attaching") from None
        except OSError as e:
            t.close()
            raise RuntimeFailure(f"{self.mode.name}: setting up the userfaultfd of {t.pid} "
                                 f"failed: {e.strerror}") from None
        self._refresh(t, time.monotonic())
        if not t.registered:
            if t.busy:
                t.close()
                raise RuntimeFailure(
                    f"{self.mode.name}: process {t.pid}'s memory is already registered with "
                    "another userfaultfd (another udamon wp/rwp session, or the program's "
                    "own); a second session would see nothing")
            self._notes.append(f"{self.mode.name}: process {t.pid} has no registrable "
                               "anonymous memory yet")
        elif t.busy:
            self._notes.append(f"{self.mode.name}: {t.busy} mapping(s) of process {t.pid} are "
                               "registered with another userfaultfd and are not sampled")

    # ------------------------------------------------------------ VMAs

    def eligible(self, v: Vma) -> bool:
        """VMAs this mode can register: anonymous private memory, and shmem."""
        if v.path in SPECIAL:
            return False
        need = "w" if self.mode is WP else "r"
        if need not in v.perms:
            return False
        if v.private:
            return v.anonymous
        return v.path.startswith(SHMEM_PREFIXES)

    def _refresh(self, t: _Target, now: float) -> None:
        t.last_refresh = now
        try:
            vmas = read_vmas(t.pid)
        except TargetGone:
            self._mark_gone(t)
            return
        if any(self.eligible(v) and (v.start, v.end) not in t.registered for v in vmas):
            # Register only while the target is frozen: a stale range would split
            # one of its VMAs and make its own mremap() of it fail (freeze.py).
            try:
                before = set(t.registered)
                with Freezer(t.pid) as fz:
                    vmas = read_vmas(t.pid)
                    alive = self._register(t, vmas)
                if not alive:
                    self._mm_gone(t)  # after the freeze: re-attaching injects again
                    return
                self.freezes += 1
                self.freeze_s += fz.held_s
                if self.protect_resident and not self._protect_resident(
                        t, sorted(t.registered - before)):
                    self._mm_gone(t)
                    return
            except TargetGone:
                self._mark_gone(t)
                return
            except (FreezeFailed, RuntimeFailure) as e:
                self.freeze_failures += 1
                if self.freeze_failures == 1:
                    self._notes.append(f"{self.mode.name}: new mappings not registered this "
                                       f"time: {e}")
                vmas = [v for v in vmas if (v.start, v.end) in t.registered]
        spans = sorted((v.start, v.end) for v in vmas
                       if self.eligible(v) and (v.start, v.end) in t.registered)
        # Forget ranges that no longer exist as such (merged, unmapped).
        t.registered &= set(spans)
        t.starts = np.asarray([s for s, _ in spans], dtype=np.uint64)
        t.ends = np.asarray([e for _, e in spans], dtype=np.uint64)

    def _register(self, t: _Target, vmas: list[Vma]) -> bool:
        """Register the eligible VMAs not registered yet; False when the mm is gone."""
        buf = bytearray(32)
        busy = 0
        for v in vmas:
            key = (v.start, v.end)
            if not self.eligible(v) or key in t.registered:
                continue
            struct.pack_into("<QQQQ", buf, 0, v.start, v.end - v.start, self.mode.register, 0)
            try:
                fcntl.ioctl(t.uffd, UFFDIO_REGISTER, buf)
            except OSError as e:
                # A dead mm (the process exec'd or exited) gives ENOMEM here.
                if e.errno == errno.ESRCH or (e.errno == errno.ENOMEM
                                              and self._mm_dead(t, v.start)):
                    return False
                if e.errno == errno.EBUSY:
                    busy += 1  # another uffd has it
                continue  # not registrable...
            t.registered.add(key)
        t.busy = busy
        return True

    def _protect_resident(self, t: _Target, spans: list[tuple[int, int]]) -> bool:
        """Protect every resident page of newly registered mappings once, with few TLB
        flushes (rwp: one per mapping; wp: one per 2 MiB walked); False when the mm is
        gone.

        Why: protecting a page whose PTE is writable (wp) or accessible (rwp) must flush
        it from every CPU running the target -- an IPI to each, ~10-20 us on a VM -- while
        protecting a page that is protected already changes nothing and needs no flush
        (x86 ``pte_needs_flush``; 0.5 us a page measured, bench/analysis.md).  Without
        this, nearly every page sampled in memory the target no longer writes is a first
        protection and pays the IPI, for as long as sampling takes to reach every page
        once (minutes on a large target).  Semantics do not change: arming a page still
        means "protected now", and a page written since this protection is protected
        again when it is sampled.  The target pays one async fault, resolved by the
        kernel, for its first write (rwp: access) to each page afterwards.  wp protects
        present pages only (``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING`` and
        ``PAGE_IS_PRESENT``): ``UFFDIO_WRITEPROTECT`` of a whole mapping would put a
        marker, and a page table, under every hole of a sparse heap.  rwp's
        ``UFFDIO_RWPROTECT`` protects present PTEs only by itself.  Done after the
        freeze: the target runs on meanwhile."""
        if not spans:
            return True
        lo = np.asarray([a for a, _ in spans], dtype=np.uint64)
        hi = np.asarray([b for _, b in spans], dtype=np.uint64)
        t0 = time.monotonic()
        try:
            if self.mode is WP:
                self.resident_protected += self._span_scanner.protect_written_resident(
                    t.pagemap, lo, hi)
            else:
                protect_spans(t.uffd, lo, hi, cmd=self.mode.protect_cmd,
                              flag=self.mode.protect_flag)
        except MmGone:
            return False
        self.resident_protect_s += time.monotonic() - t0
        return True

    def _mm_dead(self, t: _Target, addr: int) -> bool:
        try:
            self._scanner.categories(t.pagemap, np.asarray([addr], np.uint64),
                                     self.mode.scan_masks, self.page_size)
        except MmGone:
            return True
        except OSError:
            return False
        return False

    # ------------------------------------------------------------ exit / exec

    def _mark_gone(self, t: _Target) -> None:
        t.gone = True
        t.close(pidfd=True)

    def _alive(self, t: _Target) -> bool:
        if t.pidfd >= 0:
            p = select.poll()
            p.register(t.pidfd, select.POLLIN)
            return not p.poll(0)  # a pidfd is readable once the whole process has exited
        return is_alive(t.pid)

    def _mm_gone(self, t: _Target) -> None:
        """The uffd's mm is gone: the process exited or exec'd."""
        t.close()
        if self._alive(t) and t.reattached < 16:
            t.reattached += 1
            try:
                self._attach(t)
                self._notes.append(f"{self.mode.name}: process {t.pid} exec'd; attached again")
                return
            except (RuntimeFailure, OSError) as e:
                self._notes.append(f"{self.mode.name}: process {t.pid} changed (exec?) and "
                                   f"could not be attached again: {e}")
        self._mark_gone(t)

    def _usable(self, t: _Target | None) -> bool:
        return t is not None and not t.gone and t.uffd >= 0 and not self._stopped

    def _maybe_refresh(self, t: _Target) -> None:
        """Re-read the mappings once a second (DAMON's update interval): new ones are
        registered, gone ones forgotten.  Sampled addresses outside the registered
        mappings are no reason to look sooner: DAMON's three regions span the holes
        between mappings and file mappings, which are never registrable."""
        now = time.monotonic()
        if now - t.last_refresh >= REFRESH_S:
            self._refresh(t, now)

    # ------------------------------------------------------------ one aggregation

    def sample_window(self, window: Window, stop_fd: int = -1) -> tuple[np.ndarray, int]:
        """Run the window's turns from ``window.first`` for every target that has a plan;
        returns the reports of the accessed armed pages and the next turn to run
        (less than the window's turns when it ended early: a target exited or exec'd,
        or ``stop_fd`` became readable)."""
        if self._stopped:
            return empty(), window.turns
        release_stragglers()
        wts: dict[int, WindowTarget] = {}
        for pid, plan in window.plans.items():
            t = self._targets.get(pid)
            if not self._usable(t):
                continue
            assert t is not None
            pages = np.asarray(plan, dtype=np.uint64) & self._mask
            self._maybe_refresh(t)
            if not self._usable(t):
                continue
            wts[pid] = WindowTarget(t.uffd, t.pagemap, t.pidfd, pages, t.starts, t.ends)
        arm_ns = np.zeros(window.turns, dtype=np.int64)
        scan_ns = np.zeros(window.turns, dtype=np.int64)
        if not wts:
            return empty(), window.turns
        nxt, why = uffd_loop.run_window(list(wts.values()), self.mode, window.tick0_ns,
                                        window.sample_ns, window.first, stop_fd, arm_ns,
                                        scan_ns, self.loop, self.page_size, self._scanner)
        faults = self._tracer.read() if self._tracer is not None else None
        parts = []
        for pid, wt in wts.items():
            t = self._targets[pid]
            st = wt.state[window.first:nxt]
            c = self.counts
            c.armed += int(np.count_nonzero((st != uffd_loop.NOT_ARMED)
                                            & (st != uffd_loop.FAILED)))
            c.hits += int(np.count_nonzero(st == HIT))
            c.unpopulated += int(np.count_nonzero(st == uffd_loop.UNPOPULATED))
            c.failed += int(np.count_nonzero(st == uffd_loop.FAILED))
            turn, reg = np.nonzero(wt.state == HIT)
            if turn.size:
                rep = self._reports(pid, wt.pages[turn, reg], turn, window, arm_ns, scan_ns,
                                    faults)
                parts.append(rep)
            if wt.gone == uffd_loop.MM_GONE:
                self._mm_gone(t)
            elif wt.gone == uffd_loop.EXITED:
                self._mark_gone(t)
        del why  # the targets' own ``gone`` says what happened
        out = (empty() if not parts else parts[0] if len(parts) == 1
               else np.concatenate(parts))
        if out.size:
            out["node"] = nodes_of(out["cpu"])
        return out, nxt

    def _reports(self, pid: int, pages: np.ndarray, turn: np.ndarray, window: Window,
                 arm_ns: np.ndarray, scan_ns: np.ndarray,
                 faults: np.ndarray | None) -> np.ndarray:
        rep = empty(pages.size)
        # the middle of the report's sampling interval on the window's grid: the core
        # counts it in turn ``turn`` however late the turns ran (the real times only
        # serve to join the faults)
        rep["time_ns"] = (window.tick0_ns + turn.astype(np.int64) * window.sample_ns
                          + window.sample_ns // 2)
        rep["pid"] = pid
        rep["addr"] = pages
        rep["size"] = self.page_size
        rep["write"] = self.mode is WP
        rep["source"] = SOURCE_IDS[self.mode.name]
        if faults is not None and faults.size:
            self._attribute(rep, pid, arm_ns[turn], scan_ns[turn], faults)
        self.unmatched += int(np.count_nonzero(rep["cpu"] < 0))
        return rep

    def _fault_kind(self, faults: np.ndarray) -> np.ndarray:
        """Faults that an armed page's first access makes in this mode."""
        ec = faults["error_code"]
        if self.mode is WP:
            want = np.uint64(PF_PRESENT | PF_WRITE | PF_USER)
            return (ec & want) == want
        # PROT_NONE PTEs are not present to the MMU: user faults without the P bit
        return ((ec & np.uint64(PF_USER)) != 0) & ((ec & np.uint64(PF_PRESENT)) == 0)

    def _attribute(self, rep: np.ndarray, pid: int, arm: np.ndarray, until: np.ndarray,
                   faults: np.ndarray) -> None:
        """Join each report with the first fault on its page in its own turn
        (arm <= time <= scan): CPU, thread and, for rwp, write."""
        t0 = int(arm.min())
        sel = (faults["pid"] == pid) & self._fault_kind(faults) & (faults["time_ns"] >= t0)
        f = faults[sel]
        if f.size == 0:
            return
        fpage = f["addr"] & self._mask
        upages = sorted_unique(fpage)
        rank = np.searchsorted(upages, fpage).astype(np.int64)
        key = (rank << 40) | (f["time_ns"] - t0)  # rank and time within 2^40 ns (18 min)
        order = np.argsort(key, kind="stable")
        key, f = key[order], f[order]
        r = np.minimum(np.searchsorted(upages, rep["addr"]), upages.size - 1).astype(np.int64)
        has = upages[r] == rep["addr"]
        k = np.searchsorted(key, (r << 40) | (arm - t0))
        k = np.minimum(k, key.size - 1)
        m = has & ((key[k] >> 40) == r) & (f["time_ns"][k] <= until)
        src = f[k[m]]
        rep["tid"][m] = src["tid"]
        rep["cpu"][m] = src["cpu"]
        if self.mode is RWP:
            rep["write"][m] = (src["error_code"] & np.uint64(PF_WRITE)) != 0

    # ------------------------------------------------------------ for estimators

    def registered(self, pid: int) -> Registered | None:
        """The target's fds and registered spans, its mappings re-read at most once a
        second (new ones registered) as for ``sample_window``; None once it is gone.
        For code that protects and checks its own pages (a dirty-rate sample, every
        page); it tells ``lost_mm`` when an ioctl says the mm is gone."""
        t = self._targets.get(pid)
        if not self._usable(t):
            return None
        assert t is not None
        self._maybe_refresh(t)
        if not self._usable(t):
            return None
        return Registered(t.uffd, t.pagemap, t.pidfd, t.starts, t.ends)

    def lost_mm(self, pid: int) -> None:
        """``pid``'s mm is gone (an ioctl failed with ESRCH): attach again after an
        exec, or mark the target gone."""
        t = self._targets.get(pid)
        if t is not None and not t.gone:
            self._mm_gone(t)

    # ------------------------------------------------------------ one turn (API, tests)

    def arm(self, pid: int, addrs: np.ndarray) -> None:
        """Protect the pages holding ``addrs`` now (one turn; sessions use sample_window)."""
        t = self._targets.get(pid)
        if not self._usable(t):
            return
        assert t is not None
        pages = sorted_unique(np.asarray(addrs, dtype=np.uint64) & self._mask)
        self._maybe_refresh(t)
        if not self._usable(t):
            return
        pages = pages[uffd_loop.inside(pages, t.starts, t.ends, self.page_size)]
        t.arm_ns = time.monotonic_ns()
        try:
            ok = uffd_loop.protect(t.uffd, self.mode, pages, self.page_size)
        except MmGone:
            self._mm_gone(t)
            return
        if not ok.all():
            self.counts.failed += int(np.count_nonzero(~ok))
            t.last_refresh = 0.0  # refresh on the next arm
        t.armed = pages[ok]

    def poll(self, now_ns: int) -> np.ndarray:
        """Reports of the pages armed by ``arm`` that were accessed since."""
        if self._stopped:
            return empty()
        release_stragglers()
        hits: list[tuple[int, _Target, np.ndarray, int]] = []
        for pid, t in self._targets.items():
            if t.gone or t.uffd < 0 or t.armed.size == 0:
                continue
            try:
                cats = self._scanner.categories(t.pagemap, t.armed, self.mode.scan_masks,
                                                self.page_size)
            except MmGone:
                self._mm_gone(t)
                continue
            except OSError as e:
                raise RuntimeFailure(f"{self.mode.name}: scanning process {pid} failed: "
                                     f"{e.strerror}") from None
            st = uffd_loop.classify(self.mode, cats)
            pages, t.armed = t.armed[st == HIT], t.armed[:0]
            if pages.size:
                hits.append((pid, t, pages, time.monotonic_ns()))
        # after the scans: every fault of a page they found accessed is in the rings now
        faults = self._tracer.read() if self._tracer is not None else None
        parts = []
        for pid, t, pages, scanned in hits:
            turn = np.zeros(pages.size, dtype=np.intp)
            w = Window(t.arm_ns, max(1, now_ns - t.arm_ns), {}, turns=1)
            parts.append(self._reports(pid, pages, turn, w, np.asarray([t.arm_ns]),
                                       np.asarray([scanned]), faults))
        out = (empty() if not parts else parts[0] if len(parts) == 1
               else np.concatenate(parts))
        if out.size:
            out["node"] = nodes_of(out["cpu"])
        return out

    # ------------------------------------------------------------ the rest

    def exited(self) -> list[int]:
        """Targets gone (exited, exec'd, lost) since the last call, each once."""
        out = []
        for pid, t in self._targets.items():
            if not t.gone and not self._alive(t):
                self._mark_gone(t)
            if t.gone and pid not in self._told_gone:
                self._told_gone.add(pid)
                out.append(pid)
        return out

    def stats(self) -> PrimitiveStats:
        lost = self._tracer.lost if self._tracer is not None else 0
        name = self.mode.name
        notes = list(self._notes)
        if self.freezes:
            notes.append(f"{name}: froze the target {self.freezes} time(s) to register new "
                         f"mappings (threads held {self.freeze_s / self.freezes * 1e6:.0f} us "
                         "on average)")
        if self.resident_protect_s:
            what = (f"{self.resident_protected} resident written pages" if self.mode is WP
                    else "the resident pages")
            notes.append(f"{name}: protected {what} of newly registered mappings in "
                         f"{self.resident_protect_s * 1e3:.1f} ms (so that sampling memory the "
                         "target leaves alone needs no TLB flush)")
        c = self.counts
        if c.unpopulated:
            notes.append(f"{name}: {c.unpopulated} of {c.armed} armed pages "
                         f"({100 * c.unpopulated / max(c.armed, 1):.1f}%) were not populated "
                         "when checked: not observable, counted as not accessed")
        if self.unmatched:
            what = "written" if self.mode is WP else "accessed"
            extra = "" if self.mode is WP else "; counted as reads"
            notes.append(f"{name}: {self.unmatched} {what} pages had no matching user fault "
                         f"(kernel/foreign accesses): cpu and tid unknown{extra}")
        lp = self.loop
        if lp.late:
            notes.append(f"{name}: {lp.late} of {lp.turns} sampling turns started late (over "
                         "a tenth of an interval; each still lasted a whole interval)")
        return PrimitiveStats(lost_samples=lost, notes=notes)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        tracer, self._tracer = self._tracer, None
        if tracer is not None:
            try:
                tracer.close()
            except Exception:  # pragma: no cover - teardown must go on
                pass
        for t in self._targets.values():
            t.close(pidfd=True)  # closing the uffd drops every registration and protection
        deadline = time.monotonic() + 1.0
        while release_stragglers() and time.monotonic() < deadline:
            time.sleep(0.005)
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.restore()  # unmounts tracefs if it mounted it

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass


class WpPrimitive(UffdPrimitive):
    """Controlled write sampling (userfaultfd async write-protect)."""

    name = "wp"
    mode = WP


class RwpPrimitive(UffdPrimitive):
    """Controlled access sampling, reads and writes (userfaultfd async RWP, Linux 7.3+)."""

    name = "rwp"
    mode = RWP
