"""wp: controlled write sampling with userfaultfd write-protect in async mode.

How it works (DESIGN.md "Primitives", FACTS.md "userfaultfd from outside"):

* ``start``: a ``userfaultfd`` is created inside each target by ptrace
  syscall injection and taken with ``pidfd_getfd`` (udamon.targets.inject);
  ``UFFDIO_API`` enables ``UFFD_FEATURE_WP_ASYNC`` (+ ``WP_UNPOPULATED`` so a
  *read* of an armed, never-touched page does not look like a write, +
  ``WP_HUGETLBFS_SHMEM`` and ``THREAD_ID`` where present); the target's
  writable anonymous private VMAs and shmem VMAs are registered in WP mode.
  With WP_ASYNC the kernel resolves a write to a protected page by itself:
  the target never blocks, even when udamon dies.
* ``arm``: ``UFFDIO_WRITEPROTECT`` the requested pages (adjacent pages in
  one call).  Pages outside registered VMAs are not armed; /proc/PID/maps is
  re-read every second (sooner, at most every 250 ms, when an address falls
  outside) and new VMAs are registered.
* ``poll``: ``PAGEMAP_SCAN`` (category and return mask ``PAGE_IS_WRITTEN``)
  over windows of at most 128 MiB that span the armed pages; only armed
  pages count (a never-protected present page also reads as "written"); the
  scan never continues from ``walk_end`` unless the output vector was full.
  Each written page is joined with the latest ``exceptions:page_fault_user``
  sample since arming with the same pid and page and error code
  present|write|user (0x7) for CPU and thread; writes without a fault (the
  kernel writing for the target in a syscall, ``process_vm_writev``) are
  reported with cpu = tid = -1.  Written pages stay writable until armed
  again.
* ``stop``: closing the uffd unregisters every VMA and drops the protection
  of every PTE (the kernel's ``userfaultfd_release``), so nothing is left
  behind; a SIGKILLed udamon gets the same through the kernel closing its fds.

A target that execs is attached again (new mm, new uffd); one that cannot be
(seccomp after exec, ...) or exits is reported by ``exited()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from udamon.arrays import sorted_unique
from udamon.errors import RuntimeFailure, TargetGone
from udamon.intake.reports import SOURCE_IDS, empty
from udamon.primitives.base import Primitive, PrimitiveStats
from udamon.targets import inject
from udamon.targets.freeze import FreezeFailed, Freezer, release_stragglers
from udamon.targets.procmaps import Vma, is_alive, read_vmas
from udamon.targets.topology import nodes_of

# include/uapi/linux/userfaultfd.h
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)            24 bytes
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)  32 bytes
UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)    16 bytes
UFFDIO_WRITEPROTECT = 0xC018AA06  # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

# include/uapi/linux/fs.h
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)           96 bytes
PAGE_IS_WRITTEN = 1 << 1

SCAN_CHUNK = 128 << 20  # FACTS.md: walk_end came back early on a 256 MiB scan
# Armed pages closer than this share one PAGEMAP_SCAN; farther apart, each cluster gets
# its own.  Walking the page tables between them costs ~1 ns a page, an ioctl from
# Python ~3 us: joining over 2 MiB (512 pages) is cheaper than another call, joining
# over the whole span is not -- it made the cost grow with the target's size
# (5% -> 11% of a CPU from 64 MiB to 8 GiB), where DAMON's must not.
SCAN_JOIN = 2 << 20
VEC_LEN = 4096
REFRESH_S = 1.0
REFRESH_MIN_S = 0.25
WP_FAULT = 0x7  # x86 page-fault error code: present | write | user
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
SHMEM_PREFIXES = ("/dev/zero", "/SYSV", "/memfd:", "/dev/shm/", "[anon_shmem")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class PmScanArg(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "size flags start end walk_end vec vec_len max_pages category_inverted "
            "category_mask category_anyof_mask return_mask"
        ).split()
    ]


assert ctypes.sizeof(PmScanArg) == 96


def _uffd_api(fd: int, features: int) -> int:
    """UFFDIO_API; returns the features the kernel granted (all it has when asked for 0)."""
    buf = bytearray(struct.pack("<QQQ", UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, buf)
    return struct.unpack_from("<Q", buf, 8)[0]


def _self_uffd() -> int:
    flags = inject.O_CLOEXEC | inject.O_NONBLOCK
    try:
        return inject._syscall(inject.NR_USERFAULTFD, flags)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        return inject._syscall(inject.NR_USERFAULTFD, flags | inject.UFFD_USER_MODE_ONLY)


def wp_available() -> tuple[bool, str]:
    """Whether the wp primitive can work here, and why not (or what it has)."""
    if platform.machine() != inject.ARCH:
        return False, f"wp needs {inject.ARCH} for syscall injection (this is {platform.machine()})"
    try:
        fd = _self_uffd()
    except OSError as e:
        return False, f"userfaultfd() failed: {e.strerror}"
    try:
        feats = _uffd_api(fd, 0)
    except OSError as e:
        return False, f"UFFDIO_API failed: {e.strerror}"
    finally:
        os.close(fd)
    if not feats & UFFD_FEATURE_WP_ASYNC:
        return False, f"kernel lacks UFFD_FEATURE_WP_ASYNC (features {feats:#x}; needs Linux 6.7+)"
    try:
        pm = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return False, f"cannot open /proc/self/pagemap: {e.strerror}"
    try:
        arg = PmScanArg(size=96)  # empty range: validates the ioctl only
        if _libc.ioctl(pm, PAGEMAP_SCAN, ctypes.byref(arg)) < 0:
            e = ctypes.get_errno()
            return False, f"PAGEMAP_SCAN ioctl unavailable ({os.strerror(e)}; needs Linux 6.7+)"
    finally:
        os.close(pm)
    return True, f"userfaultfd features {feats:#x} (WP_ASYNC), PAGEMAP_SCAN"


def _eligible(v: Vma) -> bool:
    if v.path in SPECIAL or "w" not in v.perms:
        return False
    if v.private:
        return v.anonymous
    return v.path.startswith(SHMEM_PREFIXES)


@dataclass
class _Target:
    pid: int
    uffd: int = -1
    pagemap: int = -1
    features: int = 0
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    registered: set[tuple[int, int]] = field(default_factory=set)
    last_refresh: float = 0.0
    armed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    arm_ns: int = 0
    gone: bool = False
    reattached: int = 0

    def close(self) -> None:
        for name in ("uffd", "pagemap"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
        self.armed = np.zeros(0, np.uint64)


class _MmGone(Exception):
    """The mm the uffd/pagemap fd belongs to is gone (exit or exec)."""


class WpPrimitive(Primitive):
    name = "wp"
    kind = "controlled"
    coverage = "controlled"

    def __init__(self, pids: list[int], *, page_size: int = 4096, attribute: bool = True) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError("page_size must be a power of two")
        self.pids = sorted(set(int(p) for p in pids))
        self.page_size = page_size
        self._mask = np.uint64(~(page_size - 1) & ((1 << 64) - 1))
        self.attribute = attribute
        self._targets: dict[int, _Target] = {}
        self._tracer = None
        self._guard = None
        self._notes: list[str] = []
        self._stopped = False
        self._started = False
        self._vec = np.zeros((VEC_LEN, 3), dtype=np.uint64)
        self._arg = PmScanArg()
        self._wpbuf = bytearray(24)
        self.unmatched_writes = 0
        self.arm_failures = 0
        self.freezes = 0
        self.freeze_s = 0.0
        self.freeze_failures = 0

    # ------------------------------------------------------------ start

    def start(self, pids: list[int] | None = None) -> None:
        if self._started:
            return
        self._started = True
        if pids:
            self.pids = sorted(set(self.pids) | set(int(p) for p in pids))
        if not self.pids:
            raise RuntimeFailure("wp: no target process")
        ok, why = wp_available()
        if not ok:
            raise RuntimeFailure(f"wp primitive unavailable: {why}")
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
        from udamon.primitives.perf_tracepoint import FaultTracer
        from udamon.primitives.sysctl_guard import (
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
            self._tracer = FaultTracer(live).open()
        except RuntimeFailure as e:
            self._tracer = None
            self._notes.append(f"wp: no CPU/thread attribution ({e})")

    def _attach(self, t: _Target) -> None:
        t.close()
        t.registered = set()
        t.starts = t.ends = np.zeros(0, np.uint64)
        t.uffd = inject.inject_userfaultfd_isolated(t.pid)
        try:
            # UFFDIO_API works once per uffd: ask for everything wanted that exists.
            probe = _self_uffd()
            try:
                have = _uffd_api(probe, 0)
            finally:
                os.close(probe)
            want = UFFD_FEATURE_WP_ASYNC | (
                have & (UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                        | UFFD_FEATURE_THREAD_ID)
            )
            t.features = _uffd_api(t.uffd, want)
            t.pagemap = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            t.close()
            raise TargetGone(f"process {t.pid} exited while attaching") from None
        except OSError as e:
            t.close()
            raise RuntimeFailure(f"wp: setting up the userfaultfd of {t.pid} failed: "
                                 f"{e.strerror}") from None
        self._refresh(t, time.monotonic())
        if not t.registered:
            self._notes.append(f"wp: process {t.pid} has no registrable anonymous memory yet")

    # ------------------------------------------------------------ VMAs

    def _refresh(self, t: _Target, now: float) -> None:
        t.last_refresh = now
        try:
            vmas = read_vmas(t.pid)
        except TargetGone:
            self._mark_gone(t)
            return
        if any(_eligible(v) and (v.start, v.end) not in t.registered for v in vmas):
            # Register only while the target is frozen: a stale range would split
            # one of its VMAs and make its own mremap() of it fail (freeze.py).
            try:
                with Freezer(t.pid) as fz:
                    vmas = read_vmas(t.pid)
                    alive = self._register(t, vmas)
                if not alive:
                    self._mm_gone(t)  # after the freeze: re-attaching injects again
                    return
                self.freezes += 1
                self.freeze_s += fz.held_s
            except TargetGone:
                self._mark_gone(t)
                return
            except (FreezeFailed, RuntimeFailure) as e:
                self.freeze_failures += 1
                if self.freeze_failures == 1:
                    self._notes.append(f"wp: new mappings not registered this time: {e}")
                vmas = [v for v in vmas if (v.start, v.end) in t.registered]
        spans = sorted((v.start, v.end) for v in vmas
                       if _eligible(v) and (v.start, v.end) in t.registered)
        # Forget ranges that no longer exist as such (merged, unmapped).
        t.registered &= set(spans)
        t.starts = np.asarray([s for s, _ in spans], dtype=np.uint64)
        t.ends = np.asarray([e for _, e in spans], dtype=np.uint64)

    def _register(self, t: _Target, vmas: list[Vma]) -> bool:
        """Register the eligible VMAs not registered yet; False when the mm is gone."""
        buf = bytearray(32)
        for v in vmas:
            key = (v.start, v.end)
            if not _eligible(v) or key in t.registered:
                continue
            struct.pack_into("<QQQQ", buf, 0, v.start, v.end - v.start,
                             UFFDIO_REGISTER_MODE_WP, 0)
            try:
                fcntl.ioctl(t.uffd, UFFDIO_REGISTER, buf)
            except OSError as e:
                # A dead mm (the process exec'd or exited) gives ENOMEM here.
                if e.errno == errno.ESRCH or (e.errno == errno.ENOMEM
                                              and self._mm_dead(t, v.start)):
                    return False
                continue  # not registrable, used by another uffd...
            t.registered.add(key)
        return True

    def _mm_dead(self, t: _Target, addr: int) -> bool:
        try:
            self._scan_range(t.pagemap, addr, addr + self.page_size, [])
        except _MmGone:
            return True
        except OSError:
            return False
        return False

    def _inside(self, t: _Target, pages: np.ndarray) -> np.ndarray:
        if t.starts.size == 0:
            return np.zeros(pages.size, dtype=bool)
        i = np.searchsorted(t.starts, pages, side="right") - 1
        ok = i >= 0
        i = np.maximum(i, 0)
        return ok & (pages >= t.starts[i]) & (pages + np.uint64(self.page_size) <= t.ends[i])

    # ------------------------------------------------------------ exit / exec

    def _mark_gone(self, t: _Target) -> None:
        t.gone = True
        t.close()

    def _mm_gone(self, t: _Target) -> None:
        """The uffd's mm is gone: the process exited or exec'd."""
        t.close()
        if is_alive(t.pid) and t.reattached < 16:
            t.reattached += 1
            try:
                self._attach(t)
                self._notes.append(f"wp: process {t.pid} exec'd; attached again")
                return
            except (RuntimeFailure, OSError) as e:
                self._notes.append(f"wp: process {t.pid} changed (exec?) and could not be "
                                   f"attached again: {e}")
        self._mark_gone(t)

    # ------------------------------------------------------------ arm

    def arm(self, pid: int, addrs: np.ndarray) -> None:
        t = self._targets.get(pid)
        if t is None or t.gone or self._stopped:
            return
        now = time.monotonic()
        if now - t.last_refresh >= REFRESH_S:
            self._refresh(t, now)
            if t.gone or t.uffd < 0:
                return
        pages = sorted_unique(np.asarray(addrs, dtype=np.uint64) & self._mask)
        inside = self._inside(t, pages)
        if not inside.all() and now - t.last_refresh >= REFRESH_MIN_S:
            self._refresh(t, now)
            if t.gone or t.uffd < 0:
                return
            inside = self._inside(t, pages)
        pages = pages[inside]
        t.arm_ns = time.monotonic_ns()
        if pages.size == 0:
            t.armed = pages
            return
        # Runs of adjacent pages: one ioctl each.
        ps = np.uint64(self.page_size)
        brk = np.flatnonzero(np.diff(pages) != ps) + 1
        run_lo = np.concatenate(([0], brk))
        run_hi = np.concatenate((brk, [pages.size]))
        ok = np.ones(pages.size, dtype=bool)
        buf = self._wpbuf
        fd = t.uffd
        for a, b in zip(run_lo.tolist(), run_hi.tolist(), strict=True):
            struct.pack_into("<QQQ", buf, 0, int(pages[a]), (b - a) * self.page_size,
                             UFFDIO_WRITEPROTECT_MODE_WP)
            try:
                fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, buf)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    self._mm_gone(t)
                    return
                ok[a:b] = False  # VMA went away or changed: not armed
                self.arm_failures += b - a
                t.last_refresh = 0.0  # refresh on the next arm
        t.armed = pages[ok]

    # ------------------------------------------------------------ poll

    def _scan_range(self, fd: int, lo: int, hi: int, out: list[np.ndarray]) -> None:
        arg = self._arg
        vec = self._vec
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
            arg.category_mask = PAGE_IS_WRITTEN
            arg.category_anyof_mask = 0
            arg.return_mask = PAGE_IS_WRITTEN
            n = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.ESRCH:
                    raise _MmGone()
                raise OSError(e, f"PAGEMAP_SCAN: {os.strerror(e)}")
            if n:
                out.append(vec[:n, :2].copy())
            if n < VEC_LEN:
                return  # everything in [lo, hi) was reported: ignore walk_end (FACTS.md)
            nxt = int(arg.walk_end)
            if nxt <= lo:
                return
            lo = nxt

    def _written(self, t: _Target) -> np.ndarray:
        """The armed pages written since they were armed: one PAGEMAP_SCAN per cluster
        of nearby armed pages, so the cost follows the number of regions, not the
        size of the address space they span."""
        pages = t.armed
        runs: list[np.ndarray] = []
        if pages.size == 0:
            return pages
        ps = self.page_size
        brk = np.flatnonzero(np.diff(pages) > np.uint64(SCAN_JOIN)) + 1
        los = pages[np.concatenate(([0], brk))].tolist()
        his = (pages[np.concatenate((brk - 1, [pages.size - 1]))] + np.uint64(ps)).tolist()
        for lo, hi in zip(los, his, strict=True):
            while lo < hi:
                end = min(hi, lo + SCAN_CHUNK)
                self._scan_range(t.pagemap, lo, end, runs)
                lo = end
        if not runs:
            return pages[:0]
        r = np.concatenate(runs)
        order = np.argsort(r[:, 0], kind="stable")
        starts, ends = r[order, 0], r[order, 1]
        k = np.searchsorted(starts, pages, side="right") - 1
        hit = k >= 0
        k = np.maximum(k, 0)
        hit &= (pages >= starts[k]) & (pages < ends[k])
        return pages[hit]

    def poll(self, now_ns: int) -> np.ndarray:
        if self._stopped:
            return empty()
        release_stragglers()
        written: dict[int, np.ndarray] = {}
        for pid, t in self._targets.items():
            if t.gone or t.uffd < 0 or t.armed.size == 0:
                continue
            try:
                w = self._written(t)
            except _MmGone:
                self._mm_gone(t)
                continue
            except OSError as e:
                raise RuntimeFailure(f"wp: scanning process {pid} failed: {e.strerror}") from None
            t.armed = t.armed[:0]
            if w.size:
                written[pid] = w
        faults = self._tracer.read() if self._tracer is not None else None
        if not written:
            return empty()
        parts = []
        for pid, pages in written.items():
            rep = empty(pages.size)
            rep["time_ns"] = now_ns
            rep["pid"] = pid
            rep["addr"] = pages
            rep["size"] = self.page_size
            rep["write"] = True
            rep["source"] = SOURCE_IDS["wp"]
            if faults is not None and faults.size:
                self._attribute(rep, faults, pid, self._targets[pid].arm_ns)
            self.unmatched_writes += int(np.count_nonzero(rep["cpu"] < 0))
            parts.append(rep)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        out["node"] = nodes_of(out["cpu"])
        return out

    def _attribute(self, rep: np.ndarray, faults: np.ndarray, pid: int, arm_ns: int) -> None:
        sel = (
            (faults["pid"] == pid)
            & ((faults["error_code"] & np.uint64(WP_FAULT)) == np.uint64(WP_FAULT))
            & (faults["time_ns"] >= arm_ns)
        )
        f = faults[sel]
        if f.size == 0:
            return
        fpage = f["addr"] & self._mask
        order = np.lexsort((f["time_ns"], fpage))
        fpage = fpage[order]
        f = f[order]
        last = np.ones(f.size, dtype=bool)
        last[:-1] = fpage[1:] != fpage[:-1]  # the latest fault of each page
        fpage = fpage[last]
        f = f[last]
        k = np.searchsorted(fpage, rep["addr"])
        k = np.minimum(k, fpage.size - 1)
        m = fpage[k] == rep["addr"]
        src = f[k[m]]
        rep["tid"][m] = src["tid"]
        rep["cpu"][m] = src["cpu"]
        rep["time_ns"][m] = src["time_ns"]

    # ------------------------------------------------------------ the rest

    def exited(self) -> list[int]:
        out = []
        for pid, t in self._targets.items():
            if not t.gone and not is_alive(pid):
                self._mark_gone(t)
            if t.gone:
                out.append(pid)
        return out

    def stats(self) -> PrimitiveStats:
        lost = self._tracer.lost if self._tracer is not None else 0
        notes = list(self._notes)
        if self.freezes:
            notes.append(f"wp: froze the target {self.freezes} time(s) to register new mappings "
                         f"(threads held {self.freeze_s / self.freezes * 1e6:.0f} us on average)")
        if self.unmatched_writes:
            notes.append(f"wp: {self.unmatched_writes} written pages had no matching fault "
                         "(kernel/foreign writes): cpu and tid unknown")
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
            t.close()  # closing the uffd drops every registration and protection
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

