"""Read the ``exceptions:page_fault_user`` tracepoint with ``perf_event_open``.

No ``perf`` binary: the events are opened with the raw syscall through ctypes,
their samples land in mmapped ring buffers, and :meth:`FaultTracer.read` turns
whatever is in the buffers into one numpy structured array (``FAULT_DTYPE``).

Coverage of the target's threads (FACTS.md, measured again here):

* A task event (``pid=T``, ``cpu=N``, ``inherit=1``) sees thread T and every
  thread T creates *after* the event was opened, but not T's already
  existing siblings; a task event with ``cpu=-1`` and ``inherit`` cannot be
  mmapped.  So the default mode, ``"per-thread"``, opens one event per
  (existing thread, online CPU), all with ``inherit=1``, and redirects every
  event of a CPU into a single ring buffer with ``PERF_EVENT_IOC_SET_OUTPUT``
  (one mmap per CPU).  Threads that appear while attaching are caught by
  listing ``/proc/PID/task`` again (two more passes at most).  Such a thread
  may have inherited an event *and* have got its own, which would report each
  of its faults twice: every sample carries ``PERF_SAMPLE_IDENTIFIER`` (the
  id of the event we opened, also for inherited copies), and per thread only
  the samples of one "event family" (the events opened for one tid) are
  kept.  Only the kernel work for the target's own faults is added; other
  processes pay nothing.  Children forked by the target inherit the events
  too; their samples are dropped (``pid`` not a target).
* ``"system-wide"``: one event per CPU with ``pid=-1`` (every process's user
  faults), filtered in user space on the sample's pid (the tgid).  Complete
  by construction and cheap in fds, but every page fault on the machine pays
  the sampling cost (~2 µs) and shares the ring buffers with the target's, so
  it is the fallback when per-thread would need more than ``max_events``
  events (many threads × many CPUs).

``"auto"`` (default) picks per-thread unless it would exceed ``max_events``.

Memory order of the ring buffer: ``data_head`` is read with one aligned 8-byte
load, then the records are copied, then ``data_tail`` is written with one
aligned 8-byte store.  On x86 (TSO) loads are not reordered with older loads
and stores are not reordered with older loads, which is exactly the
``smp_rmb()`` / ``smp_mb()`` pairing the perf ABI asks for.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import re
import resource
import select
from collections.abc import Iterable
from typing import Literal

import numpy as np

from udamon.arrays import select_rows, sorted_unique
from udamon.errors import RuntimeFailure
from udamon.native import load as load_native
from udamon.system.mounts import is_mounted, mount, umount
from udamon.system.perf_ring import (
    ATTR_DISABLED,
    ATTR_INHERIT,
    ATTR_USE_CLOCKID,
    CLOCK_MONOTONIC,
    PERF_EVENT_IOC_DISABLE,
    PERF_EVENT_IOC_ENABLE,
    PERF_EVENT_IOC_SET_OUTPUT,
    PERF_RECORD_LOST,
    PERF_RECORD_SAMPLE,
    PERF_SAMPLE_CPU,
    PERF_SAMPLE_IDENTIFIER,
    PERF_SAMPLE_RAW,
    PERF_SAMPLE_TID,
    PERF_SAMPLE_TIME,
    PERF_TYPE_TRACEPOINT,
    PerfEventAttr,
    SampleParser,
    raw_size_for,
    sample_dtype,
    syscall_known,
)
from udamon.system.perf_ring import Ring as _Ring
from udamon.system.perf_ring import event_id as _event_id
from udamon.system.perf_ring import ioctl as _ioctl
from udamon.system.perf_ring import perf_event_open as _perf_event_open
from udamon.targets.topology import parse_cpulist

__all__ = ["FAULT_DTYPE", "PERF_RECORD_LOST", "PERF_RECORD_SAMPLE", "FaultTracer",
           "PerfEventAttr", "online_cpus", "page_fault_tracepoint_available"]

FAULT_DTYPE = np.dtype(
    [
        ("time_ns", np.int64),  # CLOCK_MONOTONIC, comparable with time.monotonic_ns()
        ("pid", np.int32),  # tgid
        ("tid", np.int32),
        ("cpu", np.int32),
        ("addr", np.uint64),  # faulting virtual address
        ("ip", np.uint64),  # user instruction pointer
        ("error_code", np.uint64),  # x86 page-fault error code: bit 1 = write
    ]
)

_NO_FAULTS = np.zeros(0, dtype=FAULT_DTYPE)  # what read() returns when nothing came
_native = load_native("udamon.system._perf_ring")


def native() -> bool:
    """Whether ``FaultTracer.read_reports`` reads the rings in C."""
    return _native is not None

Mode = Literal["auto", "per-thread", "system-wide"]

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEPOINT = "exceptions/page_fault_user"
# what every sample of the tracer carries (the ring-buffer layout follows from it)
SAMPLE_TYPE = (PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_CPU
               | PERF_SAMPLE_RAW)


def _open_error(e: OSError, what: str) -> RuntimeFailure:
    if e.errno in (errno.EACCES, errno.EPERM):
        try:
            with open("/proc/sys/kernel/perf_event_paranoid") as f:
                par = f.read().strip()
        except OSError:
            par = "?"
        return RuntimeFailure(
            f"perf_event_open({what}) not permitted ({e.strerror}): tracing page faults needs "
            f"root or CAP_PERFMON (kernel.perf_event_paranoid={par})"
        )
    if e.errno == errno.ENOENT:
        return RuntimeFailure(
            f"perf_event_open({what}): tracepoint {TRACEPOINT} not found in this kernel"
        )
    if e.errno == errno.ESRCH:
        return RuntimeFailure(f"perf_event_open({what}): no such process")
    if e.errno == errno.EMFILE:
        return RuntimeFailure(f"perf_event_open({what}): out of file descriptors")
    return RuntimeFailure(f"perf_event_open({what}) failed: {e.strerror}")


def online_cpus() -> list[int]:
    try:
        with open("/sys/devices/system/cpu/online") as f:
            return parse_cpulist(f.read())
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


# ---------------------------------------------------------------- tracefs


def _find_tracepoint_dir() -> str | None:
    for root in TRACEFS_DIRS:
        d = os.path.join(root, "events", TRACEPOINT)
        if os.path.exists(os.path.join(d, "id")):
            return d
    return None


class _Tracefs:
    """Find the tracepoint directory, mounting tracefs if it is not mounted."""

    def __init__(self) -> None:
        self.mounted_here: str | None = None

    def locate(self) -> str:
        d = _find_tracepoint_dir()
        if d is not None:
            return d
        root = TRACEFS_DIRS[0]
        if os.path.isdir(root) and not is_mounted(root):
            try:
                mount("tracefs", root)
            except OSError as e:
                raise RuntimeFailure(
                    f"tracefs is not mounted and mounting it failed ({e.strerror}): "
                    "cannot find the page_fault_user tracepoint id"
                ) from None
            self.mounted_here = root
            d = _find_tracepoint_dir()
            if d is not None:
                return d
        raise RuntimeFailure(f"tracepoint {TRACEPOINT} not found under {' or '.join(TRACEFS_DIRS)}")

    def release(self) -> None:
        if self.mounted_here is not None:
            umount(self.mounted_here)
            self.mounted_here = None


def _read_format(tp_dir: str) -> tuple[int, dict[str, int], int]:
    """Tracepoint id, field offsets (address, ip, error_code), raw record size."""
    with open(os.path.join(tp_dir, "id")) as f:
        tp_id = int(f.read().strip())
    with open(os.path.join(tp_dir, "format")) as f:
        text = f.read()
    offsets: dict[str, int] = {}
    end = 0
    for m in re.finditer(r"field:[^;]*?(\w+);\s*offset:(\d+);\s*size:(\d+);", text):
        name, off, size = m.group(1), int(m.group(2)), int(m.group(3))
        end = max(end, off + size)
        if name in ("address", "ip", "error_code"):
            if size != 8:
                raise RuntimeFailure(f"{TRACEPOINT}: field {name} has size {size}, expected 8")
            offsets[name] = off
    missing = {"address", "ip", "error_code"} - offsets.keys()
    if missing:
        raise RuntimeFailure(f"{TRACEPOINT}: format lacks field(s) {', '.join(sorted(missing))}")
    return tp_id, offsets, end


def _tracefs_known() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(ln.split()[-1:] == ["tracefs"] for ln in f)
    except OSError:
        return False


def page_fault_tracepoint_available() -> tuple[bool, str]:
    """Whether FaultTracer can work here, and why not (or what it will use).

    Mounts nothing: a check that mounted tracefs itself would leave it mounted
    when udamon is SIGKILLed during start-up.  When tracefs is not mounted, the
    kernel knowing it is enough; the session mounts it through the settings
    guard (whose watchdog unmounts it whatever happens).
    """
    if not syscall_known():
        import platform

        return False, f"perf_event_open number unknown for {platform.machine()}"
    tp_dir = _find_tracepoint_dir()
    if tp_dir is None:
        root = TRACEFS_DIRS[0]
        if not _tracefs_known():
            return False, "this kernel has no tracefs (CONFIG_TRACING), so no tracepoints"
        if os.path.isdir(root) and not is_mounted(root):
            return True, f"tracefs is not mounted; the session mounts it on {root}"
        return False, f"tracepoint {TRACEPOINT} not found under {' or '.join(TRACEFS_DIRS)}"
    try:
        tp_id, _, _ = _read_format(tp_dir)
        attr = _make_attr(tp_id, wakeup_events=1, inherit=False)
        try:
            fd = _perf_event_open(attr, os.getpid(), -1)
        except OSError as e:
            return False, str(_open_error(e, "self"))
        os.close(fd)
        return True, f"{TRACEPOINT} id {tp_id} ({tp_dir})"
    except (RuntimeFailure, OSError) as e:
        return False, str(e)


def _make_attr(tp_id: int, *, wakeup_events: int, inherit: bool) -> PerfEventAttr:
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_TRACEPOINT
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = tp_id
    attr.sample_period = 1
    attr.sample_type = SAMPLE_TYPE
    attr.flags = ATTR_DISABLED | ATTR_USE_CLOCKID | (ATTR_INHERIT if inherit else 0)
    attr.wakeup_events = max(1, wakeup_events)
    attr.clockid = CLOCK_MONOTONIC
    return attr


def _list_tids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------- tracer


def _member(a: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``a``'s elements that are in the sorted array ``sorted_keys``."""
    if sorted_keys.size == 0:
        return np.zeros(a.size, dtype=bool)
    i = np.minimum(np.searchsorted(sorted_keys, a), sorted_keys.size - 1)
    return sorted_keys[i] == a


class FaultTracer:
    """Trace the user page faults of some processes (all their threads).

    ``read()`` returns every fault sampled since the previous call, in buffer
    order (per CPU, time-ordered within a CPU), as a ``FAULT_DTYPE`` array.

    ``pages_per_buffer`` defaults to 256 (1 MiB per CPU, ~13k samples): hint
    faults come in bursts (a scan pass re-faults a whole buffer within a few
    ms) and with 64 pages a 4 s run of the test workload lost 5484 of ~25k
    samples while the reader was waiting for CPU; 256 pages lost none.  Call
    ``read()`` at least every few milliseconds under load; ``lost`` counts
    what the kernel dropped.
    """

    def __init__(
        self,
        pids: list[int],
        *,
        pages_per_buffer: int = 256,
        wakeup_events: int = 256,
        mode: Mode = "auto",
        max_events: int = 4096,
        cpus: Iterable[int] | None = None,
    ) -> None:
        if not pids:
            raise ValueError("FaultTracer needs at least one pid")
        if pages_per_buffer <= 0 or pages_per_buffer & (pages_per_buffer - 1):
            raise ValueError("pages_per_buffer must be a power of two")
        if mode not in ("auto", "per-thread", "system-wide"):
            raise ValueError(f"unknown mode {mode!r}")
        self.pids = sorted(set(int(p) for p in pids))
        self.pages_per_buffer = pages_per_buffer
        self.wakeup_events = wakeup_events
        self.requested_mode: Mode = mode
        self.mode: str | None = None  # the mode actually used, after open()
        self.max_events = max_events
        self.cpus = sorted(set(cpus)) if cpus is not None else online_cpus()
        self._tracefs = _Tracefs()
        self._fds: list[int] = []
        self._rings: list[_Ring] = []
        self._parser: SampleParser | None = None
        self._opened = False
        self._closed = False
        # dedup state (per-thread mode): event id -> family, tid -> kept family
        self._ids = np.zeros(0, dtype=np.uint64)
        self._fam_of_id = np.zeros(0, dtype=np.int64)
        self._families: dict[int, int] = {}  # tid an event family was opened for -> family
        self._kept_family: dict[int, int] = {}
        # (tid << 20 | family) keys decided so far, sorted: kept and dropped
        self._good_keys = np.zeros(0, dtype=np.int64)
        self._bad_keys = np.zeros(0, dtype=np.int64)
        self._poller: select.poll | None = None
        self._poll_wake = -1
        self._pid_arr = np.asarray(self.pids, dtype=np.int32)
        self._dtype: np.dtype | None = None
        self._rec_size = 0
        self._native_args: tuple | None = None
        self.duplicates_dropped = 0
        self.foreign_dropped = 0

    # -- setup ------------------------------------------------------------

    def open(self) -> FaultTracer:
        if self._closed:
            raise RuntimeFailure("FaultTracer: cannot reopen a closed tracer")
        if self._opened:
            return self
        self._opened = True
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        for pid in self.pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise RuntimeFailure(f"process {pid} does not exist")
        tp_dir = self._tracefs.locate()
        tp_id, offsets, raw_end = _read_format(tp_dir)
        self._build_dtype(offsets, raw_end)
        mode = self.requested_mode
        if mode == "auto":
            ntid = sum(len(_list_tids(p)) for p in self.pids)
            mode = "per-thread" if ntid * len(self.cpus) <= self.max_events else "system-wide"
        self.mode = mode
        if mode == "system-wide":
            self._open_system_wide(tp_id)
        else:
            self._open_per_thread(tp_id)
        for fd in self._fds:
            _ioctl(fd, PERF_EVENT_IOC_ENABLE)

    def _build_dtype(self, offsets: dict[str, int], raw_end: int) -> None:
        raw_size = raw_size_for(raw_end)  # the kernel pads u32 size + data to u64
        self._raw_size = raw_size
        fields = {"addr": (offsets["address"], "<u8"), "ip": (offsets["ip"], "<u8"),
                  "error_code": (offsets["error_code"], "<u8")}
        self._dtype = sample_dtype(SAMPLE_TYPE, raw_size, fields)
        self._rec_size = self._dtype.itemsize
        self._parser = SampleParser(self._dtype)

    def _raise_nofile(self, need: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need + 256:
            new = need + 256 if hard == resource.RLIM_INFINITY else min(hard, need + 256)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            except (ValueError, OSError):
                pass

    def _open_system_wide(self, tp_id: int) -> None:
        self._raise_nofile(len(self.cpus))
        attr = _make_attr(tp_id, wakeup_events=self.wakeup_events, inherit=False)
        for cpu in self.cpus:
            try:
                fd = _perf_event_open(attr, -1, cpu)
            except OSError as e:
                raise _open_error(e, f"cpu {cpu}, all processes") from None
            self._fds.append(fd)
            self._rings.append(_Ring(fd, self.pages_per_buffer))

    def _open_per_thread(self, tp_id: int) -> None:
        attr = _make_attr(tp_id, wakeup_events=self.wakeup_events, inherit=True)
        leader: dict[int, int] = {}  # cpu -> fd of the mmapped event
        ids: list[int] = []
        fams: list[int] = []
        done: set[int] = set()
        # List the threads again, twice at most: once every thread of a listing
        # has its events, threads they create inherit them, so only threads
        # created during the previous pass by a not-yet-covered creator need
        # their own (bounded so that a thread-spawning storm cannot stall us).
        for _ in range(3):
            todo = [(p, t) for p in self.pids for t in _list_tids(p) if t not in done]
            if not todo:
                break
            self._raise_nofile(len(self._fds) + len(todo) * len(self.cpus))
            for pid, tid in todo:
                done.add(tid)
                fam = len(self._families)
                opened_any = False
                for cpu in self.cpus:
                    try:
                        fd = _perf_event_open(attr, tid, cpu)
                    except OSError as e:
                        if e.errno == errno.ESRCH:
                            break  # thread exited meanwhile
                        raise _open_error(e, f"pid {pid} tid {tid} cpu {cpu}") from None
                    self._fds.append(fd)
                    opened_any = True
                    if cpu in leader:
                        try:
                            _ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, leader[cpu])
                        except OSError as e:
                            raise RuntimeFailure(
                                f"PERF_EVENT_IOC_SET_OUTPUT failed: {e.strerror}"
                            ) from None
                    else:
                        leader[cpu] = fd
                        self._rings.append(_Ring(fd, self.pages_per_buffer))
                    ids.append(_event_id(fd))
                    fams.append(fam)
                if opened_any:
                    self._families[tid] = fam
        if not any(os.path.exists(f"/proc/{p}") for p in self.pids):
            raise RuntimeFailure(f"process(es) {self.pids} exited while attaching")
        order = np.argsort(np.asarray(ids, dtype=np.uint64))
        self._ids = np.asarray(ids, dtype=np.uint64)[order]
        self._fam_of_id = np.asarray(fams, dtype=np.int64)[order]

    # -- reading ----------------------------------------------------------

    def fileno(self) -> int:
        """One pollable fd (the first ring); see ``filenos`` for all of them."""
        return self._rings[0].fd

    def filenos(self) -> list[int]:
        return [r.fd for r in self._rings]

    def wait(self, timeout_s: float | None, wake_fd: int = -1) -> bool:
        """Block until a ring has data past its wakeup mark (True), ``wake_fd`` (when
        >= 0) is readable, or the timeout passes."""
        if not self._rings:
            return False
        p = self._poller
        if p is None or wake_fd != self._poll_wake:
            p = self._poller = select.poll()
            for r in self._rings:
                p.register(r.fd, select.POLLIN)
            if wake_fd >= 0:
                p.register(wake_fd, select.POLLIN)
            self._poll_wake = wake_fd
        # round up: rounding down woke the caller up to 1 ms early, and it then spun
        # on poll(0) until its deadline
        ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
        return any(fd != wake_fd for fd, _ in p.poll(ms))

    @property
    def lost(self) -> int:
        """Total events the kernel dropped (PERF_RECORD_LOST) so far."""
        return self._parser.lost if self._parser is not None else 0

    def read(self) -> np.ndarray:
        """Every fault sampled since the last call (FAULT_DTYPE; an empty one is shared)."""
        if not self._rings:
            return np.zeros(0, dtype=FAULT_DTYPE)
        # one parse of every ring's records (per-CPU order kept): cheaper than parsing
        # each and concatenating structured arrays
        data = b"".join([r.take() for r in self._rings])
        if not data:
            return _NO_FAULTS
        recs = self._filter(self._parse(data))
        out = np.empty(recs.size, dtype=FAULT_DTYPE)
        out["time_ns"] = recs["time"]
        out["pid"] = recs["pid"]
        out["tid"] = recs["tid"]
        out["cpu"] = recs["cpu"]
        out["addr"] = recs["addr"]
        out["ip"] = recs["ip"]
        out["error_code"] = recs["error_code"]
        return out

    def read_reports(self, dtype: np.dtype, source: int,
                     cpu_nodes: np.ndarray) -> np.ndarray | None:
        """Every fault sampled since the last call, straight from the rings as access
        reports: an array of ``dtype`` (udamon's REPORT_DTYPE; this layer does not import
        it) with the page, the write bit of error_code, the CPU's node from
        ``cpu_nodes`` and ``source``.  One C pass (udamon.system._perf_ring) instead of
        ``read()`` and a conversion; None when the extension is not built (the caller
        converts ``read()``'s faults then)."""
        if _native is None or self._parser is None:
            return None
        pending = 0
        for r in self._rings:  # the idle path: as few steps as can be (caches are cold)
            pending += r.pending()
        if pending <= 0:
            return np.zeros(0, dtype=dtype)
        if self._native_args is None or self._native_args[0] is not dtype:
            dt = self._dtype
            assert dt is not None
            f = dt.fields
            layout = (dt.itemsize, f["id"][1], f["pid"][1], f["tid"][1], f["time"][1],
                      f["cpu"][1], f["addr"][1], f["error_code"][1])
            rf = dtype.fields
            out_layout = (dtype.itemsize, *(rf[k][1] for k in (
                "time_ns", "pid", "tid", "cpu", "node", "addr", "size", "write", "source",
                "mem", "page_node")))
            self._native_args = (dtype, layout, out_layout)
        _, layout, out_layout = self._native_args
        # the arrays themselves (contiguous, of the C types): no copies per read
        per_thread = self.mode == "per-thread" and self._ids.size > 0
        ids = self._ids if per_thread else b""
        fams = self._fam_of_id if per_thread else b""
        good = np.ascontiguousarray(self._good_keys, dtype=np.int64) if per_thread else b""
        nodes = np.ascontiguousarray(cpu_nodes, dtype=np.int32)
        # samples are at least a record each: the rings' bytes bound their number
        cap = pending // self._rec_size + 1
        out = np.empty(cap, dtype=dtype)
        keys = np.empty(cap, dtype=np.int64)
        n = undecided = 0
        for r in self._rings:
            if n >= cap:
                break
            got, foreign, und, lost = _native.take_reports(
                r.mm, r.data_off, r.data_size, layout, self._pid_arr, ids, fams, good, nodes,
                int(source), out[n:], out_layout, keys[n:])
            n += got
            undecided += und
            self.foreign_dropped += foreign
            self._parser.lost += lost
        out = out[:n]
        if undecided:  # a thread's first samples: decide its event family as read() does
            mask = self._family_mask(keys[:n])
            if mask is not None:
                out = select_rows(out, mask)
        return out

    def _parse(self, data: bytes) -> np.ndarray:
        assert self._parser is not None
        return self._parser.parse(data)

    def _filter(self, recs: np.ndarray) -> np.ndarray:
        if recs.size == 0:
            return recs
        pids = recs["pid"]
        # one target (the usual case): a comparison, not np.isin's sort
        keep = (pids == self._pid_arr[0] if self._pid_arr.size == 1
                else np.isin(pids, self._pid_arr))
        nforeign = int(recs.size - np.count_nonzero(keep))
        if nforeign:
            self.foreign_dropped += nforeign
            recs = select_rows(recs, keep)
        if self.mode != "per-thread" or recs.size == 0 or self._ids.size == 0:
            return recs
        # Keep one event family per thread (see module docstring).
        idx = np.searchsorted(self._ids, recs["id"])
        idx = np.minimum(idx, self._ids.size - 1)
        fam = np.where(self._ids[idx] == recs["id"], self._fam_of_id[idx], -1)
        tids = recs["tid"].astype(np.int64)
        mask = self._family_mask((tids << 20) | (fam & 0xFFFFF))
        return recs if mask is None else select_rows(recs, mask)

    def _family_mask(self, key: np.ndarray) -> np.ndarray | None:
        """Which samples (by ``tid << 20 | family`` key) are of their thread's kept event
        family; None when all are.  A thread's earliest-seen family is kept."""
        good = _member(key, self._good_keys)
        if (good | _member(key, self._bad_keys)).all():  # every (thread, family) known
            if good.all():
                return None
            self.duplicates_dropped += int(key.size - np.count_nonzero(good))
            return good
        ukeys, first = np.unique(key, return_index=True)
        keep: list[int] = []
        drop: list[int] = []
        for i in np.argsort(first):  # earliest-seen family of a new thread wins
            k = int(ukeys[i])
            tid, f = k >> 20, k & 0xFFFFF
            (keep if self._kept_family.setdefault(tid, f) == f else drop).append(k)
        self._good_keys = sorted_unique(np.concatenate(
            (self._good_keys, np.asarray(keep, dtype=np.int64))))
        self._bad_keys = sorted_unique(np.concatenate(
            (self._bad_keys, np.asarray(drop, dtype=np.int64))))
        mask = _member(key, self._good_keys)
        self.duplicates_dropped += int(key.size - np.count_nonzero(mask))
        return None if mask.all() else mask

    # -- teardown ---------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self._fds:
            try:
                _ioctl(fd, PERF_EVENT_IOC_DISABLE)
            except OSError:
                pass
        for r in self._rings:
            try:
                r.close()
            except (BufferError, ValueError):
                pass
        self._rings = []
        self._poller = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._tracefs.release()

    def __enter__(self) -> FaultTracer:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
