"""The ``pmu`` primitive: precise memory sampling through perf_event_open.

The hardware picks one load or store every N and says where it went: Intel PEBS
(``mem-loads`` with a load-latency threshold, ``mem-stores``), AMD IBS op (the
``ibs_op`` PMU), Arm SPE (``arm_spe_N``, records in the AUX area).  Every sample
becomes a report with the exact data address (sub-page: ``size`` 1, the access
width is not known), CPU, thread, time, load/store and the memory level decoded
from ``data_src`` (udamon.primitives.perf_mem).  The instruction-sampling route
the kernel plan names as the alternative to faults.

What this machine offers is detected from /sys/bus/event_source/devices, never
assumed, and opening an event is tried before a session starts: a VM without PMU
passthrough has none of these (``--primitive pmu`` then exits 1 saying so).

How events are opened:

* PEBS and IBS: one event per online CPU for every process (``pid=-1``), user
  space only, filtered on the sample's pid in user space: complete for threads
  and children the target creates later, but it needs root or CAP_PERFMON, and
  every process on the machine is sampled at the same period (the cost of one
  sample is the hardware's: PEBS and IBS write a record per sample, ~1 µs).
  Samples share one ring buffer per CPU (PERF_EVENT_IOC_SET_OUTPUT).
* SPE: one event per existing thread of the targets (``cpu=-1``), each with its
  own ring and AUX area; the CPU of a chunk of SPE records is the CPU of the
  PERF_RECORD_AUX that announced it (the kernel ends an AUX transaction when the
  thread is scheduled out), its time the record's time.  Threads created later
  are not covered.

Not exercised live: this project's machines have no hardware PMU (``perf stat -e
cycles`` says "not supported"), so the event setup runs only against the kernel
ABI as documented; the ring-buffer parsing (shared with the tracepoint reader,
udamon.system.perf_ring), the data_src decoding and the SPE packet decoder
are tested on constructed bytes for PEBS, IBS and SPE layouts (tests/test_pmu.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import RuntimeFailure
from udamon.intake.reports import SOURCE_IDS, empty
from udamon.primitives import perf_mem
from udamon.primitives.arm_spe import SpeDecoder
from udamon.primitives.base import Primitive, PrimitiveStats
from udamon.system.fdwait import wait_fds
from udamon.system.perf_ring import (
    ATTR_DISABLED,
    ATTR_EXCLUDE_HV,
    ATTR_EXCLUDE_KERNEL,
    ATTR_PRECISE_SHIFT,
    ATTR_SAMPLE_ID_ALL,
    ATTR_USE_CLOCKID,
    CLOCK_MONOTONIC,
    PERF_EVENT_IOC_DISABLE,
    PERF_EVENT_IOC_ENABLE,
    PERF_EVENT_IOC_SET_OUTPUT,
    PERF_RECORD_AUX,
    PERF_SAMPLE_ADDR,
    PERF_SAMPLE_CPU,
    PERF_SAMPLE_DATA_SRC,
    PERF_SAMPLE_IDENTIFIER,
    PERF_SAMPLE_TID,
    PERF_SAMPLE_TIME,
    PERF_SAMPLE_WEIGHT,
    PerfEventAttr,
    Ring,
    SampleParser,
    event_id,
    ioctl,
    perf_event_open,
    sample_dtype,
    syscall_known,
)
from udamon.targets.procmaps import is_alive
from udamon.targets.topology import nodes_of, parse_cpulist

DEVICES = "/sys/bus/event_source/devices"
# What a PEBS or IBS sample carries (the list): its layout is sample_dtype(MEM_SAMPLE)
MEM_SAMPLE = (PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_ADDR
              | PERF_SAMPLE_CPU | PERF_SAMPLE_WEIGHT | PERF_SAMPLE_DATA_SRC)
# SPE: samples are in the AUX area; the ring carries PERF_RECORD_AUX with a sample_id trailer
SPE_SAMPLE = PERF_SAMPLE_IDENTIFIER | PERF_SAMPLE_TID | PERF_SAMPLE_TIME | PERF_SAMPLE_CPU
KERNEL_START = 1 << 63  # at or above: kernel addresses (x86-64 and arm64 alike)
LDLAT = 30  # cycles: perf mem's default load-latency threshold
DEFAULT_PERIOD = {"pebs": 10_007, "ibs": 1 << 16, "spe": 4096}
RING_PAGES = 256
AUX_PAGES = 256
NO_PMU = ("no precise-sampling PMU is available on this machine (no Intel PEBS "
          "cpu/events/mem-loads, no AMD IBS ibs_op, no Arm SPE arm_spe_*; a VM without "
          "PMU passthrough has none)")


@dataclass
class PmuEvent:
    label: str  # e.g. "cpu/mem-loads,ldlat=30/"
    type: int
    config: int = 0
    config1: int = 0
    config2: int = 0
    precise: int = 0  # precise_ip wanted (PEBS)
    aux_leader: bool = False  # a group leader whose own samples are not reports
    needs_leader: bool = False  # opened in the aux leader's group (mem-loads on SPR/hybrid)


@dataclass
class Backend:
    kind: str  # "pebs" | "ibs" | "spe"
    pmu: str  # its directory under DEVICES
    events: list[PmuEvent] = field(default_factory=list)
    formats: dict = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        names = {"pebs": "Intel PEBS", "ibs": "AMD IBS op", "spe": "Arm SPE"}
        return f"{names[self.kind]} ({', '.join(e.label for e in self.events if not e.aux_leader)})"


# ---------------------------------------------------------------- sysfs


def read_formats(pmu_dir: str) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """format/<name> files: name -> (config field, [(lo, hi) bit ranges])."""
    out: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    d = os.path.join(pmu_dir, "format")
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(d, name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(config\d?):([\d,\-]+)", text)
        if not m:
            continue
        bits = []
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            bits.append((int(lo), int(hi or lo)))
        out[name] = (m.group(1), bits)
    return out


def encode_event(spec: str, formats: dict, **override: int) -> tuple[int, int, int]:
    """An event string of sysfs ("event=0xcd,umask=0x1,ldlat=3") -> config, config1,
    config2, with the format files' bit positions; ``override`` sets more terms."""
    terms: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        k, _, v = part.partition("=")
        terms[k.strip()] = int(v, 0) if v else 1
    terms.update(override)
    cfg = {"config": 0, "config1": 0, "config2": 0}
    for k, v in terms.items():
        if k not in formats:
            raise ValueError(f"unknown event term {k!r}")
        field_name, ranges = formats[k]
        if field_name not in cfg:
            continue
        shift = 0
        for lo, hi in ranges:
            width = hi - lo + 1
            cfg[field_name] |= ((v >> shift) & ((1 << width) - 1)) << lo
            shift += width
    return cfg["config"], cfg["config1"], cfg["config2"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def detect(devices: str = DEVICES) -> list[Backend]:
    """The precise-sampling PMUs this kernel exposes, best first."""
    out: list[Backend] = []
    try:
        names = sorted(os.listdir(devices))
    except OSError:
        return out
    for pmu in ("cpu", "cpu_core", "cpu_atom"):
        d = os.path.join(devices, pmu)
        loads = _read(os.path.join(d, "events", "mem-loads"))
        typ = _read(os.path.join(d, "type"))
        if pmu not in names or loads is None or typ is None:
            continue
        fm = read_formats(d)
        b = Backend("pebs", pmu, formats=fm)
        aux = _read(os.path.join(d, "events", "mem-loads-aux"))
        if aux is not None:  # Sapphire Rapids, hybrid big cores: the group's leader
            c, c1, c2 = encode_event(aux, fm)
            b.events.append(PmuEvent(f"{pmu}/mem-loads-aux/", int(typ), c, c1, c2,
                                     precise=3, aux_leader=True))
        c, c1, c2 = encode_event(loads, fm, **({"ldlat": LDLAT} if "ldlat" in fm else {}))
        b.events.append(PmuEvent(f"{pmu}/mem-loads,ldlat={LDLAT}/P", int(typ), c, c1, c2,
                                 precise=3, needs_leader=aux is not None))
        stores = _read(os.path.join(d, "events", "mem-stores"))
        if stores is not None:
            c, c1, c2 = encode_event(stores, fm)
            b.events.append(PmuEvent(f"{pmu}/mem-stores/P", int(typ), c, c1, c2, precise=3))
        out.append(b)
    typ = _read(os.path.join(devices, "ibs_op", "type"))
    if typ is not None:
        fm = read_formats(os.path.join(devices, "ibs_op"))
        c, c1, c2 = encode_event("", fm, **({"cnt_ctl": 1} if "cnt_ctl" in fm else {}))
        out.append(Backend("ibs", "ibs_op", [PmuEvent("ibs_op//", int(typ), c, c1, c2)], fm))
    for pmu in names:
        if re.fullmatch(r"arm_spe_\d+", pmu):
            typ = _read(os.path.join(devices, pmu, "type"))
            if typ is None:
                continue
            fm = read_formats(os.path.join(devices, pmu))
            want = {k: 1 for k in ("load_filter", "store_filter", "jitter", "ts_enable")
                    if k in fm}
            c, c1, c2 = encode_event("", fm, **want)
            out.append(Backend("spe", pmu, [PmuEvent(f"{pmu}/load_filter,store_filter/",
                                                     int(typ), c, c1, c2)], fm))
            break
    return out


def make_attr(ev: PmuEvent, period: int, sample_type: int, *, exclude_kernel: bool = True,
              precise: int | None = None, sample_id_all: bool = False) -> PerfEventAttr:
    attr = PerfEventAttr()
    attr.type = ev.type
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config, attr.config1, attr.config2 = ev.config, ev.config1, ev.config2
    attr.sample_period = period
    attr.sample_type = sample_type
    p = ev.precise if precise is None else precise
    attr.flags = (ATTR_DISABLED | ATTR_USE_CLOCKID | ATTR_EXCLUDE_HV
                  | (ATTR_EXCLUDE_KERNEL if exclude_kernel else 0)
                  | (ATTR_SAMPLE_ID_ALL if sample_id_all else 0)
                  | ((p & 3) << ATTR_PRECISE_SHIFT))
    attr.wakeup_events = 64
    attr.clockid = CLOCK_MONOTONIC
    return attr


def _open(ev: PmuEvent, period: int, sample_type: int, pid: int, cpu: int,
          group_fd: int = -1, sample_id_all: bool = False) -> int:
    """Open one event, stepping precise_ip down (3 -> 1) and, for IBS on CPUs without
    the user/kernel filter, falling back to the software filter or none (kernel
    addresses are dropped in user space anyway)."""
    last: OSError | None = None
    precise_steps = [ev.precise] if ev.precise <= 1 else list(range(ev.precise, 0, -1))
    for excl in (True, False):
        for p in precise_steps:
            try:
                return perf_event_open(make_attr(ev, period, sample_type, exclude_kernel=excl,
                                                 precise=p, sample_id_all=sample_id_all),
                                       pid, cpu, group_fd)
            except OSError as e:
                last = e
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
    assert last is not None
    raise last


def _open_failure(e: OSError, what: str) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        par = _read("/proc/sys/kernel/perf_event_paranoid") or "?"
        return (f"opening {what} is not permitted ({e.strerror}): the pmu primitive samples "
                f"every process, which needs root or CAP_PERFMON "
                f"(kernel.perf_event_paranoid={par})")
    return f"opening {what} failed: {e.strerror} (the kernel lists it but will not use it)"


def pmu_available(devices: str = DEVICES) -> tuple[bool, str]:
    """Whether --primitive pmu can run here, and why not (one line)."""
    if not syscall_known():
        import platform

        return False, f"perf_event_open number unknown for {platform.machine()}"
    backends = detect(devices)
    if not backends:
        return False, NO_PMU
    reasons = []
    for b in backends:
        ev = next(e for e in b.events if not e.aux_leader)
        try:
            if b.kind == "spe":
                fd = _open(ev, DEFAULT_PERIOD["spe"], SPE_SAMPLE, os.getpid(), -1,
                           sample_id_all=True)
            else:
                fd = _open(ev, DEFAULT_PERIOD[b.kind], MEM_SAMPLE, -1, _first_cpu())
        except OSError as e:
            reasons.append(f"{b.describe()}: {_open_failure(e, ev.label)}")
            continue
        os.close(fd)
        return True, b.describe()
    return False, "; ".join(reasons)


def _first_cpu() -> int:
    cpus = _online_cpus()
    return cpus[0] if cpus else 0


def _online_cpus() -> list[int]:
    text = _read("/sys/devices/system/cpu/online")
    try:
        return parse_cpulist(text) if text else list(range(os.cpu_count() or 1))
    except ValueError:
        return list(range(os.cpu_count() or 1))


# ---------------------------------------------------------------- samples -> reports


def mem_samples_to_reports(recs: np.ndarray, pids: np.ndarray,
                           skip_ids: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """PEBS/IBS samples (sample_dtype(MEM_SAMPLE)) -> reports of the target pids.
    Returns (reports, samples that were not a user-space load or store of a target)."""
    if recs.size == 0:
        return empty(0), 0
    store, load, level = perf_mem.decode(recs["data_src"])
    keep = (np.isin(recs["pid"], pids) & (store | load) & (recs["addr"] != 0)
            & (recs["addr"] < np.uint64(KERNEL_START)))
    if skip_ids is not None and skip_ids.size:
        keep &= ~np.isin(recs["id"], skip_ids)
    r = recs[keep]
    out = empty(r.size)
    out["time_ns"] = r["time"]
    out["pid"] = r["pid"]
    out["tid"] = r["tid"]
    out["cpu"] = r["cpu"]
    out["node"] = nodes_of(r["cpu"])
    out["addr"] = r["addr"]
    out["size"] = 1  # the address is exact; the access width is not known
    out["write"] = store[keep]
    out["mem"] = level[keep]
    out["source"] = SOURCE_IDS["pmu"]
    return out, int(recs.size - r.size)


_AUX = struct.Struct("<QQQ")  # aux_offset, aux_size, flags
_SPE_TRAILER = struct.Struct("<iiqiIQ")  # pid, tid, time, cpu, res, identifier


class SpeStream:
    """One SPE event: PERF_RECORD_AUX announcements -> decoded records -> reports."""

    def __init__(self, pid: int, tid: int) -> None:
        self.pid = pid
        self.tid = tid
        self.decoder = SpeDecoder()
        self.truncated = 0
        self.pending: list[np.ndarray] = []

    def on_aux(self, rec: bytes, take_aux) -> None:
        """A PERF_RECORD_AUX (header + offset, size, flags + sample_id trailer)."""
        off, size, flags = _AUX.unpack_from(rec, 8)
        _pid, tid, t, cpu, _res, _ident = _SPE_TRAILER.unpack_from(rec, 8 + _AUX.size)
        if flags & 0x01:  # PERF_AUX_FLAG_TRUNCATED
            self.truncated += 1
        if size == 0:
            return
        recs = self.decoder.decode(take_aux(off, size))
        recs = recs[recs["is_ldst"] & (recs["addr"] != 0)
                    & (recs["addr"] < np.uint64(KERNEL_START))]
        if recs.size == 0:
            return
        out = empty(recs.size)
        out["time_ns"] = t
        out["pid"] = self.pid
        ctx = recs["context"]
        out["tid"] = np.where(ctx >= 0, ctx, tid if tid > 0 else self.tid)
        out["cpu"] = cpu
        out["node"] = nodes_of(np.full(recs.size, cpu))
        out["addr"] = recs["addr"]
        out["size"] = 1
        out["write"] = recs["store"]
        out["mem"] = recs["level"]
        out["source"] = SOURCE_IDS["pmu"]
        self.pending.append(out)

    def take(self) -> list[np.ndarray]:
        out, self.pending = self.pending, []
        return out


# ---------------------------------------------------------------- the primitive


class PmuPrimitive(Primitive):
    name = "pmu"
    kind = "observational"
    coverage = "unknown"

    def __init__(self, period: int | None = None, devices: str = DEVICES) -> None:
        self.period = period
        self.devices = devices
        self.backend: Backend | None = None
        self._fds: list[int] = []
        self._rings: list[tuple[Ring, SampleParser, SpeStream | None]] = []
        self._pids = np.zeros(0, dtype=np.int32)
        self._exited: set[int] = set()
        self._skip_ids = np.zeros(0, dtype=np.uint64)
        self._notes: list[str] = []
        self.not_memory = 0  # samples that were not a target's user-space load/store
        self._stopped = False

    def start(self, pids: list[int]) -> None:
        ok, why = pmu_available(self.devices)
        if not ok:
            raise RuntimeFailure(why)
        self._pids = np.asarray(sorted(set(pids)), dtype=np.int32)
        backends = detect(self.devices)
        self.backend = backends[0]
        period = self.period or DEFAULT_PERIOD[self.backend.kind]
        try:
            if self.backend.kind == "spe":
                self._open_spe(period)
            else:
                self._open_per_cpu(period)
            for fd in self._fds:
                ioctl(fd, PERF_EVENT_IOC_ENABLE)
        except BaseException:
            self.stop()
            raise
        self._notes.append(f"pmu: {self.backend.describe()}, one sample every {period} "
                           f"{'operations' if self.backend.kind != 'pebs' else 'events'}")

    def _open_per_cpu(self, period: int) -> None:
        b = self.backend
        assert b is not None
        dt = sample_dtype(MEM_SAMPLE)
        skip: list[int] = []
        for cpu in _online_cpus():
            leader_fd = -1
            ring_fd = -1
            for ev in b.events:
                try:
                    fd = _open(ev, period, MEM_SAMPLE, -1, cpu,
                               group_fd=leader_fd if ev.needs_leader else -1)
                except OSError as e:
                    raise RuntimeFailure(_open_failure(e, f"{ev.label} on CPU {cpu}")) from None
                self._fds.append(fd)
                if ev.aux_leader:
                    leader_fd = fd
                    skip.append(event_id(fd))
                if ring_fd < 0:
                    ring_fd = fd
                    self._rings.append((Ring(fd, RING_PAGES), SampleParser(dt), None))
                else:
                    ioctl(fd, PERF_EVENT_IOC_SET_OUTPUT, ring_fd)
        self._skip_ids = np.asarray(sorted(skip), dtype=np.uint64)

    def _open_spe(self, period: int) -> None:
        b = self.backend
        assert b is not None
        ev = b.events[0]
        for pid in self._pids.tolist():
            try:
                tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
            for tid in tids:
                try:
                    fd = _open(ev, period, SPE_SAMPLE, tid, -1, sample_id_all=True)
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        continue
                    raise RuntimeFailure(_open_failure(e, f"{ev.label} for tid {tid}")) from None
                self._fds.append(fd)
                ring = Ring(fd, 16)
                ring.open_aux(AUX_PAGES)
                stream = SpeStream(pid, tid)
                parser = SampleParser(sample_dtype(SPE_SAMPLE), on_other=self._aux_handler(
                    ring, stream))
                self._rings.append((ring, parser, stream))
        self._notes.append("pmu (SPE): threads created after the start are not sampled")

    @staticmethod
    def _aux_handler(ring: Ring, stream: SpeStream):
        def on_other(typ: int, rec: bytes) -> None:
            if typ == PERF_RECORD_AUX:
                stream.on_aux(rec, ring.take_aux)
        return on_other

    def poll(self, now_ns: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        for ring, parser, stream in self._rings:
            recs = parser.parse(ring.take())
            if stream is None:
                reps, other = mem_samples_to_reports(recs, self._pids, self._skip_ids)
                self.not_memory += other
                if reps.size:
                    parts.append(reps)
            else:
                parts.extend(stream.take())
        if not parts:
            return empty(0)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def wait(self, timeout_s: float, wake_fd: int = -1) -> bool:
        return wait_fds([ring.fd for ring, _, _ in self._rings], timeout_s, wake_fd)

    def exited(self) -> list[int]:
        out = []
        for pid in self._pids.tolist():
            if pid not in self._exited and not is_alive(pid):
                self._exited.add(pid)
                out.append(pid)
        return out

    def stats(self) -> PrimitiveStats:
        lost = sum(p.lost for _, p, _ in self._rings)
        notes = list(self._notes)
        trunc = sum(s.truncated for _, _, s in self._rings if s is not None)
        if trunc:
            notes.append(f"pmu (SPE): {trunc} AUX chunks were truncated (records lost)")
        return PrimitiveStats(lost_samples=lost, notes=notes)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for fd in self._fds:
            try:
                ioctl(fd, PERF_EVENT_IOC_DISABLE)
            except OSError:
                pass
        for ring, _, _ in self._rings:
            try:
                ring.close()
            except (BufferError, ValueError):
                pass
        self._rings = []
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
