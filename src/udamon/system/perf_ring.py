"""perf_event_open and its ring buffers, shared by every perf-based reader.

The tracepoint reader (``perf_tracepoint.FaultTracer``, for hint and wp) and the
precise-sampling reader (``pmu``) both open events with the raw syscall through
ctypes, mmap their ring buffers and parse PERF_RECORD_SAMPLE records into numpy
structured arrays.  This module holds what they share:

* the ABI: constants, ``PerfEventAttr``, ``perf_event_open``, ioctls;
* ``Ring``: one mmapped ring buffer (and its AUX area, for Arm SPE), with the
  documented memory order for ``data_head``/``data_tail``;
* ``sample_dtype``: the layout of a sample record for a ``sample_type`` (the
  field order of include/uapi/linux/perf_event.h), fixed-size fields only;
* ``SampleParser``: whole chunks of ring data -> samples, in bulk when the chunk
  holds only samples of the expected size, else run by run, stepping over other
  records and counting PERF_RECORD_LOST.

Memory order of the ring buffer: ``data_head`` is read with one aligned 8-byte
load, then the records are copied, then ``data_tail`` is written with one
aligned 8-byte store.  On x86 (TSO) loads are not reordered with older loads
and stores are not reordered with older loads, which is exactly the
``smp_rmb()`` / ``smp_mb()`` pairing the perf ABI asks for.  On arm64 the
ctypes accesses are plain loads and stores; the pmu primitive (the only reader
there, for SPE) has not been run on arm64 hardware.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import struct
from collections.abc import Callable

import numpy as np

from udamon.errors import RuntimeFailure

PAGE = mmap.PAGESIZE
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241}

# perf ABI constants (include/uapi/linux/perf_event.h)
PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_TYPE_RAW = 4

PERF_SAMPLE_IP = 1 << 0
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_TIME = 1 << 2
PERF_SAMPLE_ADDR = 1 << 3
PERF_SAMPLE_READ = 1 << 4
PERF_SAMPLE_CALLCHAIN = 1 << 5
PERF_SAMPLE_ID = 1 << 6
PERF_SAMPLE_CPU = 1 << 7
PERF_SAMPLE_PERIOD = 1 << 8
PERF_SAMPLE_STREAM_ID = 1 << 9
PERF_SAMPLE_RAW = 1 << 10
PERF_SAMPLE_BRANCH_STACK = 1 << 11
PERF_SAMPLE_REGS_USER = 1 << 12
PERF_SAMPLE_STACK_USER = 1 << 13
PERF_SAMPLE_WEIGHT = 1 << 14
PERF_SAMPLE_DATA_SRC = 1 << 15
PERF_SAMPLE_IDENTIFIER = 1 << 16
PERF_SAMPLE_TRANSACTION = 1 << 17
PERF_SAMPLE_REGS_INTR = 1 << 18
PERF_SAMPLE_PHYS_ADDR = 1 << 19
PERF_SAMPLE_AUX = 1 << 20
PERF_SAMPLE_CGROUP = 1 << 21
PERF_SAMPLE_DATA_PAGE_SIZE = 1 << 22
PERF_SAMPLE_CODE_PAGE_SIZE = 1 << 23
PERF_SAMPLE_WEIGHT_STRUCT = 1 << 24

PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_RECORD_AUX = 11
PERF_RECORD_LOST_SAMPLES = 13
PERF_AUX_FLAG_TRUNCATED = 0x01
PERF_FLAG_FD_CLOEXEC = 1 << 3

# perf_event_attr.flags bits
ATTR_DISABLED = 1 << 0
ATTR_INHERIT = 1 << 1
ATTR_EXCLUDE_KERNEL = 1 << 5
ATTR_EXCLUDE_HV = 1 << 6
ATTR_PRECISE_SHIFT = 15  # precise_ip: 2 bits
ATTR_SAMPLE_ID_ALL = 1 << 18
ATTR_USE_CLOCKID = 1 << 25

PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_OUTPUT = 0x2405
PERF_EVENT_IOC_ID = 0x80082407
CLOCK_MONOTONIC = 1

# Offsets in struct perf_event_mmap_page.
_OFF_DATA_HEAD = 1024
_OFF_DATA_TAIL = 1032
_OFF_DATA_OFFSET = 1040
_OFF_DATA_SIZE = 1048
_OFF_AUX_HEAD = 1056
_OFF_AUX_TAIL = 1064
_OFF_AUX_OFFSET = 1072
_OFF_AUX_SIZE = 1080


class PerfEventAttr(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PerfEventAttr) == 136

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC) -> int:
    """The raw syscall; OSError with the kernel's errno on failure."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise RuntimeFailure(f"perf_event_open: unsupported architecture {platform.machine()}")
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_long(pid),
                       ctypes.c_long(cpu), ctypes.c_long(group_fd), ctypes.c_ulong(flags))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def syscall_known() -> bool:
    return platform.machine() in _NR_PERF_EVENT_OPEN


def ioctl(fd: int, req: int, arg: int = 0) -> None:
    import fcntl

    fcntl.ioctl(fd, req, arg)


def event_id(fd: int) -> int:
    import fcntl

    buf = bytearray(8)
    fcntl.ioctl(fd, PERF_EVENT_IOC_ID, buf)
    return struct.unpack("<Q", buf)[0]


# ---------------------------------------------------------------- ring buffer


class Ring:
    """One mmapped perf ring buffer (the output of every event on one CPU), and
    optionally its AUX area (Arm SPE writes its records there)."""

    def __init__(self, fd: int, pages: int) -> None:
        self.fd = fd
        try:
            self.mm = mmap.mmap(fd, (1 + pages) * PAGE, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            hint = " (perf_event_mlock_kb limit?)" if e.errno == errno.EPERM else ""
            raise RuntimeFailure(
                f"cannot mmap a {pages}-page perf ring buffer: {e.strerror}{hint}") from None
        self._head = ctypes.c_uint64.from_buffer(self.mm, _OFF_DATA_HEAD)
        self._tail = ctypes.c_uint64.from_buffer(self.mm, _OFF_DATA_TAIL)
        off = ctypes.c_uint64.from_buffer(self.mm, _OFF_DATA_OFFSET).value
        size = ctypes.c_uint64.from_buffer(self.mm, _OFF_DATA_SIZE).value
        self.data_off = int(off) or PAGE
        self.data_size = int(size) or pages * PAGE
        self.aux: mmap.mmap | None = None
        self.aux_size = 0

    def pending(self) -> int:
        """Bytes of records the kernel has written and the reader not yet released."""
        return self._head.value - self._tail.value

    def take(self) -> bytes:
        """Copy every complete record available and release the space."""
        head = self._head.value  # one aligned load (smp_rmb implied on x86)
        tail = self._tail.value
        n = head - tail
        if n <= 0:
            return b""
        size = self.data_size
        start = tail % size
        base = self.data_off
        if start + n <= size:
            data = self.mm[base + start: base + start + n]
        else:
            first = size - start
            data = self.mm[base + start: base + size] + self.mm[base: base + n - first]
        self._tail.value = head  # one aligned store after the copy
        return data

    def open_aux(self, pages: int) -> None:
        """Map the AUX area (``pages`` a power of two) right after the ring."""
        offset = self.data_off + self.data_size
        ctypes.c_uint64.from_buffer(self.mm, _OFF_AUX_OFFSET).value = offset
        ctypes.c_uint64.from_buffer(self.mm, _OFF_AUX_SIZE).value = pages * PAGE
        try:
            self.aux = mmap.mmap(self.fd, pages * PAGE, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as e:
            raise RuntimeFailure(f"cannot mmap a {pages}-page AUX area: {e.strerror}") from None
        self.aux_size = pages * PAGE
        self._aux_tail = ctypes.c_uint64.from_buffer(self.mm, _OFF_AUX_TAIL)

    def take_aux(self, offset: int, size: int) -> bytes:
        """The AUX bytes a PERF_RECORD_AUX announced; releases them."""
        assert self.aux is not None
        start = offset % self.aux_size
        if start + size <= self.aux_size:
            data = self.aux[start: start + size]
        else:
            first = self.aux_size - start
            data = self.aux[start:] + self.aux[: size - first]
        self._aux_tail.value = offset + size
        return data

    def close(self) -> None:
        # ctypes views keep exported buffers alive; drop them before closing.
        del self._head, self._tail
        if self.aux is not None:
            del self._aux_tail
            self.aux.close()
            self.aux = None
        self.mm.close()


# ---------------------------------------------------------------- sample layout

# (sample_type bit, field names, formats) in the kernel's order (perf_output_sample)
_FIXED: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
    (PERF_SAMPLE_IDENTIFIER, ("id",), ("<u8",)),
    (PERF_SAMPLE_IP, ("ip",), ("<u8",)),
    (PERF_SAMPLE_TID, ("pid", "tid"), ("<i4", "<i4")),
    (PERF_SAMPLE_TIME, ("time",), ("<i8",)),
    (PERF_SAMPLE_ADDR, ("addr",), ("<u8",)),
    (PERF_SAMPLE_ID, ("sample_id",), ("<u8",)),
    (PERF_SAMPLE_STREAM_ID, ("stream_id",), ("<u8",)),
    (PERF_SAMPLE_CPU, ("cpu", "cpu_res"), ("<i4", "<u4")),
    (PERF_SAMPLE_PERIOD, ("period",), ("<u8",)),
]
_AFTER_RAW: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
    (PERF_SAMPLE_DATA_SRC, ("data_src",), ("<u8",)),
    (PERF_SAMPLE_TRANSACTION, ("transaction",), ("<u8",)),
    (PERF_SAMPLE_PHYS_ADDR, ("phys_addr",), ("<u8",)),
    (PERF_SAMPLE_CGROUP, ("cgroup",), ("<u8",)),
    (PERF_SAMPLE_DATA_PAGE_SIZE, ("data_page_size",), ("<u8",)),
    (PERF_SAMPLE_CODE_PAGE_SIZE, ("code_page_size",), ("<u8",)),
]
_VARIABLE = (PERF_SAMPLE_READ | PERF_SAMPLE_CALLCHAIN | PERF_SAMPLE_BRANCH_STACK
             | PERF_SAMPLE_REGS_USER | PERF_SAMPLE_STACK_USER | PERF_SAMPLE_REGS_INTR
             | PERF_SAMPLE_AUX)


def raw_size_for(raw_end: int) -> int:
    """PERF_SAMPLE_RAW is ``u32 size`` + data padded so that both end on 8 bytes."""
    return ((4 + raw_end + 7) & ~7) - 4


def sample_dtype(sample_type: int, raw_size: int = 0,
                 raw_fields: dict[str, tuple[int, str]] | None = None) -> np.dtype:
    """The numpy layout of one PERF_RECORD_SAMPLE for ``sample_type`` (fixed-size
    fields only): ``type``, ``size`` from the header, then the fields in the kernel's
    order; with PERF_SAMPLE_RAW, ``rawsize`` and ``raw_fields`` (name -> (offset in
    the raw data, format)) of a ``raw_size``-byte raw area."""
    if sample_type & _VARIABLE:
        raise ValueError("sample_type has variable-size fields this parser does not take")
    names, formats, offsets = ["type", "size"], ["<u4", "<u2"], [0, 6]
    off = 8

    def add(fields, fmts):
        nonlocal off
        for n, f in zip(fields, fmts, strict=True):
            names.append(n)
            formats.append(f)
            offsets.append(off)
            off += np.dtype(f).itemsize

    for bit, fields, fmts in _FIXED:
        if sample_type & bit:
            add(fields, fmts)
    if sample_type & PERF_SAMPLE_RAW:
        names.append("rawsize")
        formats.append("<u4")
        offsets.append(off)
        for n, (o, f) in (raw_fields or {}).items():
            names.append(n)
            formats.append(f)
            offsets.append(off + 4 + o)
        off += 4 + raw_size
    if sample_type & PERF_SAMPLE_WEIGHT_STRUCT:
        add(("weight", "weight2", "weight3"), ("<u4", "<u2", "<u2"))
    elif sample_type & PERF_SAMPLE_WEIGHT:
        add(("weight",), ("<u8",))
    for bit, fields, fmts in _AFTER_RAW:
        if sample_type & bit:
            add(fields, fmts)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": off})


class SampleParser:
    """Ring bytes -> samples of one layout; counts PERF_RECORD_LOST, and hands other
    records (e.g. PERF_RECORD_AUX) to ``on_other(type, bytes)`` when given."""

    def __init__(self, dtype: np.dtype,
                 on_other: Callable[[int, bytes], None] | None = None) -> None:
        self.dtype = dtype
        self.rec_size = dtype.itemsize
        self.lost = 0
        self.on_other = on_other

    def parse(self, data: bytes) -> np.ndarray:
        dt = self.dtype
        n = len(data)
        if n == 0:
            return np.zeros(0, dtype=dt)
        rs = self.rec_size
        if n % rs == 0:  # fast path: only samples of the expected size
            recs = np.frombuffer(data, dtype=dt)
            if np.all(recs["type"] == PERF_RECORD_SAMPLE) and np.all(recs["size"] == rs):
                return recs
        return self._parse_slow(data)

    def _parse_slow(self, data: bytes) -> np.ndarray:
        """Mixed records: take runs of samples in bulk, step over the others one by one."""
        dt = self.dtype
        rs = self.rec_size
        hdr = struct.Struct("<IHH")
        lost_s = struct.Struct("<QQ")
        runs: list[np.ndarray] = []
        off = 0
        n = len(data)
        while off + 8 <= n:
            k = (n - off) // rs
            if k:
                run = np.frombuffer(data, dtype=dt, count=k, offset=off)
                bad = np.flatnonzero((run["type"] != PERF_RECORD_SAMPLE) | (run["size"] != rs))
                m = int(bad[0]) if bad.size else k
                if m:
                    runs.append(run[:m])
                    off += m * rs
                    continue
            typ, _misc, size = hdr.unpack_from(data, off)
            if size < 8 or off + size > n:
                break  # corrupt or truncated: give up on this chunk
            if typ == PERF_RECORD_LOST and size >= 24:
                self.lost += lost_s.unpack_from(data, off + 8)[1]
            elif typ == PERF_RECORD_LOST_SAMPLES and size >= 16:
                self.lost += struct.unpack_from("<Q", data, off + 8)[0]
            elif typ == PERF_RECORD_SAMPLE and size == rs:
                runs.append(np.frombuffer(data, dtype=dt, count=1, offset=off))
            elif self.on_other is not None:
                self.on_other(typ, data[off: off + size])
            off += size
        if not runs:
            return np.zeros(0, dtype=dt)
        return runs[0] if len(runs) == 1 else np.concatenate(runs)
