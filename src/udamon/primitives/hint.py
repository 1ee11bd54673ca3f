"""The ``hint`` primitive: NUMA-balancing hinting faults as access reports.

With ``kernel.numa_balancing`` on, the kernel periodically makes a task's
PTEs PROT_NONE and the next access to each page faults.  Every user page
fault of the targets is read from the ``exceptions:page_fault_user``
tracepoint (``FaultTracer``) and becomes a report: who (CPU, node, thread),
where (the page) and how (error_code bit 1: write).

What it cannot see: only the *first* access after a hint faults, so a
read-modify-write shows as a read, and a page is seen at most once per scan
pass.  The kernel's scanner, not udamon, decides what is sampled and when: it
goes quiet for seconds when it thinks placement is good, so coverage is
"unknown" and a quiet region is "not observed", not "not accessed".
Faults that are not hints (first touch, copy-on-write) are real accesses too
and are reported the same way.
"""

from __future__ import annotations

import os
import select
import time

import numpy as np

from udamon.errors import RuntimeFailure
from udamon.intake.reports import REPORT_DTYPE, SOURCE_IDS, empty
from udamon.primitives.base import Primitive, PrimitiveStats
from udamon.system.perf_tracepoint import FaultTracer, page_fault_tracepoint_available
from udamon.system.sysctl_guard import (
    SettingsGuard,
    apply_numa_balancing,
    apply_tracefs,
    restore_stale,
)
from udamon.targets.procmaps import is_alive
from udamon.targets.topology import cpu_to_node, nodes_of

PAGE = 4096
WRITE_BIT = 0x2

SYSTEM_CHANGES = (
    "kernel.numa_balancing is switched on for the session (system-wide: every process's "
    "pages get hinting faults and may be migrated between nodes), and, where writable, "
    "the scan tunables in /sys/kernel/debug/sched/numa_balancing/ are set from the "
    "sampling interval (or --hint-scan-period/--hint-scan-size); all are restored when "
    "udamon exits, also when it is killed (a watchdog process restores them); a setting "
    "another udamon session still needs is left to the last one out"
)


def hint_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "the hint primitive needs root (it changes kernel.numa_balancing)"
    if not os.path.exists("/proc/sys/kernel/numa_balancing"):
        return False, "this kernel has no NUMA balancing (CONFIG_NUMA_BALANCING)"
    return page_fault_tracepoint_available()


def faults_to_reports(faults: np.ndarray) -> np.ndarray:
    """FAULT_DTYPE -> REPORT_DTYPE (vectorised)."""
    out = empty(faults.size)
    if faults.size == 0:
        return out
    out["time_ns"] = faults["time_ns"]
    out["pid"] = faults["pid"]
    out["tid"] = faults["tid"]
    out["cpu"] = faults["cpu"]
    out["node"] = nodes_of(faults["cpu"])
    out["addr"] = faults["addr"] & ~np.uint64(PAGE - 1)
    out["size"] = PAGE
    out["write"] = (faults["error_code"] & np.uint64(WRITE_BIT)) != 0
    out["source"] = SOURCE_IDS["hint"]
    return out


_NO_REPORTS = empty(0)  # shared, never written: it has no element


class HintPrimitive(Primitive):
    name = "hint"
    kind = "observational"
    coverage = "unknown"

    def __init__(self, sample_us: int, *, enable_balancing: bool = True,
                 state_dir: str | None = None, scan_period_ms: int | None = None,
                 scan_size_mb: int | None = None):
        self.sample_us = sample_us
        self.scan_period_ms = scan_period_ms  # None: derived from sample_us
        self.scan_size_mb = scan_size_mb
        self.enable_balancing = enable_balancing
        self._state_dir = state_dir
        self._guard: SettingsGuard | None = None
        self._tracer: FaultTracer | None = None
        self._pids: list[int] = []
        self._exited: set[int] = set()
        self._gone_at_start: list[int] = []
        self._notes: list[str] = []
        self._warnings: list[str] = []
        self._faults: dict[int, int] = {}  # pid -> faults seen
        self._t0 = 0.0
        self._stopped = False
        self._pidfds: dict[int, int] | None = None
        self._pidpoll: select.poll | None = None
        self._cpu_nodes = cpu_to_node()

    def start(self, pids: list[int]) -> None:
        ok, why = hint_available()
        if not ok:
            raise RuntimeFailure(why)
        self._pids = list(pids)
        self._faults = dict.fromkeys(self._pids, 0)
        self._t0 = time.monotonic()
        kw = {} if self._state_dir is None else {"state_dir": self._state_dir}
        for line in restore_stale(**kw):
            self._notes.append(f"restored settings left by a crashed udamon: {line}")
        try:
            self._guard = SettingsGuard(handle_signals=False, **kw)
            if self.enable_balancing:
                self._notes.extend(apply_numa_balancing(
                    self._guard, self.sample_us, scan_period_ms=self.scan_period_ms,
                    scan_size_mb=self.scan_size_mb))
            # tracefs through the guard, so that even a SIGKILLed udamon unmounts it
            self._notes.extend(apply_tracefs(self._guard))
            self._open_tracer()
            self._notes.append(f"fault tracer mode: {self._tracer.mode}")
        except BaseException:
            self.stop()
            raise

    def _open_tracer(self) -> None:
        """Open the tracer on the targets still alive: with several targets, one that
        exits during start-up must not cost the others their session."""
        for _ in range(3):
            alive = [p for p in self._pids if is_alive(p)]
            gone = [p for p in self._pids if p not in alive]
            if not alive:
                raise RuntimeFailure(
                    f"process {gone[0]} does not exist" if len(gone) == 1 else
                    f"processes {', '.join(map(str, gone))} exited before monitoring started")
            self._gone_at_start.extend(gone)
            self._pids = alive
            try:
                # hint faults come in bursts of a whole scan pass: 4 MiB per CPU holds ~80k
                # wake udamon at 4096 faults, not 256: the loop reads at each
                # aggregation's end anyway, and a 4 MiB ring still has ~15x headroom
                self._tracer = FaultTracer(self._pids, pages_per_buffer=1024,
                                           wakeup_events=4096).open()
                return
            except RuntimeFailure:
                if all(is_alive(p) for p in self._pids):
                    raise  # not a target that went away
        raise RuntimeFailure("the target processes keep exiting during start-up")

    def gone_at_start(self) -> list[int]:
        return list(self._gone_at_start)

    def poll(self, now_ns: int) -> np.ndarray:
        if self._tracer is None:
            return empty(0)
        reports = self._tracer.read_reports(REPORT_DTYPE, SOURCE_IDS["hint"],
                                            self._cpu_nodes)
        if reports is None:  # no C ring reader: the numpy path, same reports
            reports = faults_to_reports(self._tracer.read())
        if not reports.size:
            return _NO_REPORTS  # an idle interval: no array work (its cost is hint's idle cost)
        if len(self._faults) == 1:
            for pid in self._faults:
                self._faults[pid] += int(reports.size)
        else:
            pids, counts = np.unique(reports["pid"], return_counts=True)
            for pid, n in zip(pids.tolist(), counts.tolist(), strict=True):
                self._faults[pid] = self._faults.get(pid, 0) + n
        return reports

    def wait(self, timeout_s: float, wake_fd: int = -1) -> bool:
        if self._tracer is None:
            return super().wait(timeout_s, wake_fd)
        return self._tracer.wait(timeout_s, wake_fd)

    def exited(self) -> list[int]:
        """Targets that exited since the last call: a pidfd (readable once the whole
        process has exited) per target, polled without blocking; /proc where pidfds
        are not available."""
        if self._pidfds is None:
            self._pidfds = {}
            for pid in self._pids:
                try:
                    self._pidfds[pid] = os.pidfd_open(pid)
                except OSError:
                    self._pidfds[pid] = -1
            self._pidpoll = select.poll()
            for fd in self._pidfds.values():
                if fd >= 0:
                    self._pidpoll.register(fd, select.POLLIN)
        ready = {fd for fd, _ in self._pidpoll.poll(0)} if self._pidpoll else set()
        out = []
        for pid, fd in self._pidfds.items():
            if pid in self._exited:
                continue
            if (fd in ready) if fd >= 0 else not is_alive(pid):
                self._exited.add(pid)
                out.append(pid)
                if fd >= 0:
                    self._pidpoll.unregister(fd)
        return out

    def stats(self) -> PrimitiveStats:
        lost = self._tracer.lost if self._tracer is not None else 0
        return PrimitiveStats(lost_samples=lost, notes=list(self._notes),
                              warnings=list(self._warnings))

    def _note_unobserved(self) -> None:
        """A target with no fault at all is easily mistaken for a cold one: say it is not."""
        secs = time.monotonic() - self._t0
        for pid in self._pids:
            if self._faults.get(pid, 0) == 0:
                msg = (f"no hinting faults observed for pid {pid} in {secs:.0f} s: the kernel's "
                       "NUMA scanner did not sample it; this is 'not observed', not 'cold'; "
                       "see docs/primitives.md")
                self._warnings.append(msg)
                self._notes.append(msg)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for fd in (self._pidfds or {}).values():
            if fd >= 0:
                os.close(fd)
        self._pidfds, self._pidpoll = {}, None
        try:
            if self._tracer is not None:
                self._note_unobserved()  # counts what poll() delivered: what the record has
                self._tracer.close()
        finally:
            if self._guard is not None:
                for line in self._guard.restore():
                    self._notes.append(line)

