"""A minimal driver of the kernel's DAMON through sysfs (``paddr`` or ``vaddr`` operations).

Used by the benchmarks to compare udamon with the kernel's own DAMON on the
same workload.  What it does, in the order the sysfs ABI wants
(Documentation/admin-guide/mm/damon/usage.rst):

- adds one kdamond (``kdamonds/nr_kdamonds`` + 1), one context with
  ``operations`` = ``paddr`` (or ``vaddr``), the monitoring intervals and
  ``nr_regions`` bounds, one target whose initial regions are the given
  physical ranges (vaddr: ``pid_target`` is the process; with no ranges the
  kernel derives the initial regions from its mappings itself), and
  one ``stat`` scheme matching every region (its access-pattern maxima are
  set explicitly: they default to 0, which matches nothing);
- ``state`` = ``on``;
- ``snapshot()`` writes ``update_schemes_tried_regions`` to ``state`` and
  reads ``schemes/0/tried_regions/*`` (start, end, nr_accesses, age): the way
  damo takes live snapshots;
- ``stop()`` (idempotent) writes ``off``, waits until the kdamond is off and
  writes the original ``nr_kdamonds`` back.  It also runs from an ``atexit``
  hook and on SIGINT/SIGTERM, so a kdamond started here is never left running.

The kernel refuses to change ``nr_kdamonds`` while any kdamond runs (EBUSY),
and changing it resets the configuration of every idle kdamond.  So this
driver never touches a kdamond it did not start: it is unavailable while any
kdamond runs, and with idle kdamonds present it needs ``allow_reset=True``.

``virt_to_pfns()`` maps a process's virtual pages to page frame numbers
through ``/proc/<pid>/pagemap`` (root: PFN bits 0-54 when bit 63 says the
page is present); ``pfn_ranges()`` turns them into a few physical ranges that
cover them, for ``start()``; ``classify_pages()`` looks up, per page, the
``nr_accesses`` of the kernel region holding it.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from udamon.errors import RuntimeFailure

ADMIN = "/sys/kernel/mm/damon/admin"
PAGE = 4096
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class KernelAttrs:
    sample_us: int = 5_000
    aggr_us: int = 100_000
    update_us: int = 1_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1_000


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _running_kdamonds(root: str) -> list[int]:
    kd = os.path.join(root, "kdamonds")
    try:
        nr = int(_read(os.path.join(kd, "nr_kdamonds")))
    except (OSError, ValueError):
        return []
    out = []
    for i in range(nr):
        try:
            if _read(os.path.join(kd, str(i), "state")) == "on":
                out.append(i)
        except OSError:
            pass
    return out


def kernel_damon_available(root: str = ADMIN, *, allow_reset: bool = False,
                           check_root: bool = True, ops: str = "paddr") -> tuple[bool, str]:
    """(ok, one-line reason when not)."""
    if check_root and os.geteuid() != 0:
        return False, "kernel DAMON sysfs needs root"
    nr_file = os.path.join(root, "kdamonds", "nr_kdamonds")
    if not os.path.exists(nr_file):
        return False, f"no DAMON sysfs interface ({nr_file} missing: CONFIG_DAMON_SYSFS off?)"
    running = _running_kdamonds(root)
    if running:
        pids = []
        for i in running:
            try:
                pids.append(_read(os.path.join(root, "kdamonds", str(i), "pid")))
            except OSError:
                pids.append("?")
        desc = ", ".join(f"{i} (pid {p})" for i, p in zip(running, pids, strict=True))
        return False, (f"kdamond {desc} is already running and was not started by udamon; "
                       "the kernel refuses to change nr_kdamonds while any kdamond runs "
                       "(EBUSY) and udamon does not stop what it did not start")
    nr = int(_read(nr_file))
    if nr and not allow_reset:
        return False, (f"{nr} idle kdamond(s) are configured; adding one resets their "
                       "configuration (pass allow_reset=True to accept that)")
    have = _avail_operations(root, nr)
    if have is not None and ops not in have:
        return False, f"this kernel's DAMON has no {ops} operations (has: {' '.join(have)})"
    return True, ""


def _avail_operations(root: str, nr: int) -> list[str] | None:
    """Read contexts/0/avail_operations of an existing kdamond, or None if there is none."""
    for i in range(nr):
        path = os.path.join(root, "kdamonds", str(i), "contexts", "0", "avail_operations")
        try:
            return _read(path).split()
        except OSError:
            continue
    return None


class KernelDamon:
    """One kdamond with one paddr (or vaddr) context, started and always stopped by us."""

    def __init__(self, attrs: KernelAttrs | None = None, *, root: str = ADMIN,
                 allow_reset: bool = False, handle_signals: bool = True, ops: str = "paddr"):
        if ops not in ("paddr", "vaddr"):
            raise ValueError(f"unsupported DAMON operations {ops!r}")
        self.ops = ops
        self.pid: int | None = None
        self.attrs = attrs or KernelAttrs()
        self.root = root
        self.allow_reset = allow_reset
        self.handle_signals = handle_signals
        self.idx: int | None = None
        self._orig_nr: int | None = None
        self._old_handlers: dict[int, object] = {}
        self._atexit = False

    # -- sysfs helpers (overridden by tests with a fake tree) --------------------
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, "kdamonds", *parts)

    def _write(self, path: str, value) -> None:
        with open(path, "w") as f:
            f.write(f"{value}\n")

    def _available(self) -> tuple[bool, str]:
        return kernel_damon_available(self.root, allow_reset=self.allow_reset, ops=self.ops)

    def _kd(self, *parts: str) -> str:
        assert self.idx is not None
        return self._path(str(self.idx), *parts)

    # -- lifecycle --------------------------------------------------------------
    @property
    def running(self) -> bool:
        if self.idx is None:
            return False
        try:
            return _read(self._kd("state")) == "on"
        except OSError:
            return False

    def start(self, ranges: list[tuple[int, int]], pid: int | None = None) -> None:
        """paddr: monitor these physical ranges; vaddr: process ``pid`` (its mappings, or
        only ``ranges`` of its address space when given)."""
        if self._orig_nr is not None:
            raise RuntimeFailure("kernel DAMON driver already started")
        if self.ops == "vaddr":
            if pid is None:
                raise RuntimeFailure("kernel DAMON vaddr needs a process id")
            self.pid = pid
        elif not ranges:
            raise RuntimeFailure("kernel DAMON: no physical ranges to monitor")
        ok, why = self._available()
        if not ok:
            raise RuntimeFailure(f"kernel DAMON unavailable: {why}")
        self._orig_nr = int(_read(self._path("nr_kdamonds")))
        self._install_hooks()
        try:
            self._write(self._path("nr_kdamonds"), self._orig_nr + 1)
            self.idx = self._orig_nr
            self._configure(ranges)
            self._write(self._kd("state"), "on")
        except BaseException:
            self.stop()
            raise

    def _configure(self, ranges: list[tuple[int, int]]) -> None:
        a = self.attrs
        self._write(self._kd("contexts", "nr_contexts"), 1)
        ctx = ("contexts", "0")
        ops = _read(self._kd(*ctx, "avail_operations")).split()
        if self.ops not in ops:
            raise RuntimeFailure(f"kernel DAMON has no {self.ops} operations "
                                 f"(has: {' '.join(ops)})")
        self._write(self._kd(*ctx, "operations"), self.ops)
        iv = (*ctx, "monitoring_attrs", "intervals")
        self._write(self._kd(*iv, "sample_us"), a.sample_us)
        self._write(self._kd(*iv, "aggr_us"), a.aggr_us)
        self._write(self._kd(*iv, "update_us"), a.update_us)
        nr = (*ctx, "monitoring_attrs", "nr_regions")
        # write max first: min may not exceed the current max
        self._write(self._kd(*nr, "max"), a.max_nr_regions)
        self._write(self._kd(*nr, "min"), a.min_nr_regions)
        self._write(self._kd(*ctx, "targets", "nr_targets"), 1)
        if self.ops == "vaddr":
            self._write(self._kd(*ctx, "targets", "0", "pid_target"), self.pid)
        reg = (*ctx, "targets", "0", "regions")
        self._write(self._kd(*reg, "nr_regions"), len(ranges))
        for i, (s, e) in enumerate(sorted(ranges)):
            self._write(self._kd(*reg, str(i), "start"), int(s))
            self._write(self._kd(*reg, str(i), "end"), int(e))
        self._write(self._kd(*ctx, "schemes", "nr_schemes"), 1)
        sch = (*ctx, "schemes", "0")
        self._write(self._kd(*sch, "action"), "stat")
        ap = (*sch, "access_pattern")
        for what, hi in (("sz", U64_MAX), ("nr_accesses", U32_MAX), ("age", U32_MAX)):
            self._write(self._kd(*ap, what, "max"), hi)
            self._write(self._kd(*ap, what, "min"), 0)

    def snapshot(self) -> list[tuple[int, int, int, int]]:
        """The regions of the last aggregation: [(start, end, nr_accesses, age)], sorted."""
        if not self.running:
            raise RuntimeFailure("kernel DAMON is not running")
        self._write(self._kd("state"), "update_schemes_tried_regions")
        tried = self._kd("contexts", "0", "schemes", "0", "tried_regions")
        out = []
        for name in os.listdir(tried):
            if not name.isdigit():
                continue
            d = os.path.join(tried, name)
            try:
                out.append((int(_read(os.path.join(d, "start"))),
                            int(_read(os.path.join(d, "end"))),
                            int(_read(os.path.join(d, "nr_accesses"))),
                            int(_read(os.path.join(d, "age")))))
            except (OSError, ValueError):
                continue  # a region dir removed under us: the next snapshot has it
        out.sort()
        return out

    def stop(self) -> None:
        """Turn our kdamond off and restore nr_kdamonds.  Idempotent."""
        if self._orig_nr is None:
            self._remove_hooks()
            return
        errors = []
        if self.idx is not None:
            try:
                if _read(self._kd("state")) != "off":
                    try:
                        self._write(self._kd("state"), "off")
                    except OSError:
                        # a vaddr kdamond whose process exited stops by itself, and
                        # refuses "off" (EPERM) while it does: the wait below settles it
                        if self.ops != "vaddr":
                            raise
                deadline = time.monotonic() + 10
                while _read(self._kd("state")) != "off" and time.monotonic() < deadline:
                    time.sleep(0.01)
            except OSError as e:
                errors.append(f"turning kdamond {self.idx} off: {e}")
        try:
            self._write(self._path("nr_kdamonds"), self._orig_nr)
        except OSError as e:
            errors.append(f"restoring nr_kdamonds={self._orig_nr}: {e}")
        if errors:
            raise RuntimeFailure("kernel DAMON cleanup: " + "; ".join(errors))
        self._orig_nr = None
        self.idx = None
        self._remove_hooks()

    def __enter__(self) -> KernelDamon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- never leave a kdamond running --------------------------------------------
    def _install_hooks(self) -> None:
        if not self._atexit:
            atexit.register(self._stop_quietly)
            self._atexit = True
        if not self.handle_signals:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def _remove_hooks(self) -> None:
        if self._atexit:
            atexit.unregister(self._stop_quietly)
            self._atexit = False
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers.clear()

    def _stop_quietly(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum)
        self._stop_quietly()
        if callable(old):
            old(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)


# -- virtual -> physical ---------------------------------------------------------------

def virt_to_pfns(pid: int, start: int, end: int) -> np.ndarray:
    """PFN of every page of [start, end) of process pid; 0 where not present (needs root)."""
    first, n = start // PAGE, (end - start + PAGE - 1) // PAGE
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read(n * 8)
    ent = np.frombuffer(raw, dtype=np.uint64)
    present = (ent & np.uint64(PRESENT)) != 0
    return np.where(present, ent & np.uint64(PFN_MASK), np.uint64(0))


def pfn_ranges(pfns: np.ndarray, max_ranges: int = 16) -> list[tuple[int, int]]:
    """A few physical byte ranges covering every present PFN: the span cut at the largest gaps."""
    p = np.unique(pfns[pfns != 0])
    if p.size == 0:
        return []
    if max_ranges <= 1 or p.size == 1:
        return [(int(p[0]) * PAGE, (int(p[-1]) + 1) * PAGE)]
    gaps = np.diff(p)
    cut = np.sort(np.argsort(gaps)[::-1][: max_ranges - 1])
    cut = cut[gaps[cut] > 1]
    starts = np.concatenate([[p[0]], p[cut + 1]])
    ends = np.concatenate([p[cut], [p[-1]]]) + 1
    return [(int(s) * PAGE, int(e) * PAGE) for s, e in zip(starts, ends, strict=True)]


def classify_pages(pfns: np.ndarray, regions: list[tuple[int, int, int, int]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per page: nr_accesses and age of the kernel region holding it (-1 when none does)."""
    nr = np.full(pfns.size, -1, dtype=np.int64)
    age = np.full(pfns.size, -1, dtype=np.int64)
    if not regions:
        return nr, age
    r = np.array(regions, dtype=np.uint64)
    addr = pfns.astype(np.uint64) * np.uint64(PAGE)
    i = np.searchsorted(r[:, 0], addr, side="right") - 1
    ok = (pfns != 0) & (i >= 0)
    i = np.clip(i, 0, None)
    ok &= addr < r[i, 1]
    nr[ok] = r[i[ok], 2].astype(np.int64)
    age[ok] = r[i[ok], 3].astype(np.int64)
    return nr, age
