"""The report channel's wire format: how another process hands reports to a live session.

A producer connects to the session's unix socket (or writes to its stdin) and
speaks one of two framings, told apart by the first bytes:

* **binary**: a 64-byte hello (``HELLO_DTYPE``, magic ``UDAMONRP``), answered on a
  socket by a 16-byte reply (``UDAMONOK`` or ``UDAMONNO`` + a reason code), then
  fixed-size 48-byte records (``WIRE_DTYPE``), little-endian, back to back.  Every
  record carries the format version, so a stream that gets out of step is caught
  at the first record after the slip.
* **text**: a CSV header line with the replay input's columns
  (``time_ns,pid,tid,cpu,addr,size,write`` in any order, optional ``node``,
  ``source``, ``mem``), then one report per line: what shell pipelines (bpftrace,
  awk) produce.

Both carry the same fields as ``REPORT_DTYPE``.  ``time_ns`` is CLOCK_MONOTONIC in
nanoseconds (bpftrace's ``nsecs``, ``clock_gettime(CLOCK_MONOTONIC)``); 0 asks the
session to stamp the report when it arrives.  docs/report-channel.md is the
user-facing description; clients/udamon_report.h is the C side of the same layout.

A binary record of kind ``KIND_DROPS`` is not a report: its ``addr`` holds the
total number of reports the producer has dropped so far (its socket was full and
it chose not to block), so the session's record can say exactly what was lost.
"""

from __future__ import annotations

import struct

import numpy as np

from udamon.intake.reports import MEM_LEVELS, REPORT_DTYPE, SOURCE_IDS, SOURCES, empty

VERSION = 1
MAGIC = b"UDAMONRP"
REPLY_OK = b"UDAMONOK"
REPLY_NO = b"UDAMONNO"
KIND_REPORT = 0
KIND_DROPS = 1
# reasons a session refuses a producer (the reply's code)
REFUSE_PERMISSION = 1  # not the session's user nor root
REFUSE_VERSION = 2  # a version or record size this session does not speak
REFUSE_HELLO = 3  # the hello does not parse
REFUSE_REASONS = {REFUSE_PERMISSION: "not the session's user nor root",
                  REFUSE_VERSION: "unsupported wire version or record size",
                  REFUSE_HELLO: "malformed hello"}

WIRE_DTYPE = np.dtype({
    "names": ["version", "kind", "write", "source", "mem", "time_ns", "addr", "size",
              "pid", "tid", "cpu", "node"],
    "formats": ["u1", "u1", "u1", "u1", "u1", "<i8", "<u8", "<u8", "<i4", "<i4", "<i4",
                "<i4"],
    "offsets": [0, 1, 2, 3, 4, 8, 16, 24, 32, 36, 40, 44],
    "itemsize": 48,
})
RECORD_SIZE = WIRE_DTYPE.itemsize

HELLO_SIZE = 64
_HELLO = struct.Struct("<8sHHI48s")  # magic, version, record_size, flags, name
_REPLY = struct.Struct("<8sHHI")  # magic, version or reason code, record_size, 0
REPLY_SIZE = _REPLY.size
assert _HELLO.size == HELLO_SIZE and REPLY_SIZE == 16

# An access must end at or below the last page under 2^64 (replay's rule).
ADDR_END = (1 << 64) - 4096
EXTERNAL = SOURCE_IDS["external"]


class WireError(ValueError):
    """A hello or a stream that is not the wire format."""


def encode_hello(name: str, version: int = VERSION, record_size: int = RECORD_SIZE) -> bytes:
    raw = name.encode("utf-8", "replace")[:48]
    return _HELLO.pack(MAGIC, version, record_size, 0, raw)


def parse_hello(data: bytes) -> tuple[int, int, str]:
    """(version, record_size, name) of a 64-byte hello; WireError when it is not one."""
    if len(data) < HELLO_SIZE:
        raise WireError(f"hello is {len(data)} bytes, expected {HELLO_SIZE}")
    magic, version, rsize, _flags, raw = _HELLO.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r} (expected {MAGIC!r})")
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return version, rsize, name


def encode_reply(ok: bool, code: int = 0) -> bytes:
    return _REPLY.pack(REPLY_OK if ok else REPLY_NO, VERSION if ok else code, RECORD_SIZE, 0)


def parse_reply(data: bytes) -> tuple[bool, str]:
    """(accepted, why not) from a session's 16-byte reply."""
    if len(data) < REPLY_SIZE:
        return False, "the session closed the connection (not its user nor root?)"
    magic, code, _rsize, _ = _REPLY.unpack_from(data)
    if magic == REPLY_OK:
        return True, ""
    if magic == REPLY_NO:
        return False, REFUSE_REASONS.get(code, f"refused (code {code})")
    return False, f"not a udamon session (reply {magic!r})"


def encode(reports: np.ndarray) -> bytes:
    """REPORT_DTYPE -> wire records (what udamon.reporter sends)."""
    w = np.zeros(reports.size, dtype=WIRE_DTYPE)
    w["version"] = VERSION
    w["kind"] = KIND_REPORT
    for name in ("write", "source", "mem", "time_ns", "addr", "size", "pid", "tid", "cpu",
                 "node"):
        w[name] = reports[name]
    return w.tobytes()


def encode_drops(total: int) -> bytes:
    w = np.zeros(1, dtype=WIRE_DTYPE)
    w["version"] = VERSION
    w["kind"] = KIND_DROPS
    w["addr"] = total
    return w.tobytes()


class Decoded:
    """What one chunk of records held."""

    __slots__ = ("reports", "drops_total", "bad", "why_bad", "out_of_step")

    def __init__(self) -> None:
        self.reports = empty(0)
        self.drops_total: int | None = None  # the last drop notice's total, if any
        self.bad = 0  # records refused (a field out of range)
        self.why_bad = ""  # the first refusal, for the record's notes
        self.out_of_step: int | None = None  # index of a record with another version


def decode(data: bytes | bytearray | memoryview) -> Decoded:
    """Whole records -> reports (vectorised).  Records with a field out of range are
    counted in ``bad`` and skipped; a record with another version means the stream is
    out of step: decoding stops there (``out_of_step``) and the caller drops the
    producer."""
    out = Decoded()
    n = len(data) // RECORD_SIZE
    if n == 0:
        return out
    w = np.frombuffer(data, dtype=WIRE_DTYPE, count=n)
    wrong = np.flatnonzero(w["version"] != VERSION)
    if wrong.size:
        out.out_of_step = int(wrong[0])
        w = w[: out.out_of_step]
    if w.size == 0:
        return out
    kind = w["kind"]
    if (kind != KIND_REPORT).any():
        notices = w[kind == KIND_DROPS]
        if notices.size:
            out.drops_total = int(notices["addr"].max())
        unknown = int(((kind != KIND_REPORT) & (kind != KIND_DROPS)).sum())
        if unknown:
            out.bad += unknown
            out.why_bad = f"record kind {int(kind[(kind > KIND_DROPS)][0])} is unknown"
        w = w[kind == KIND_REPORT]
    addr, size = w["addr"], w["size"]
    ok = ((w["write"] <= 1) & (w["source"] < len(SOURCES)) & (w["mem"] < len(MEM_LEVELS))
          & (size >= 1) & (addr < np.uint64(ADDR_END)) & (size <= np.uint64(ADDR_END) - addr)
          & (w["pid"] >= 0) & (w["tid"] >= -1) & (w["cpu"] >= -1) & (w["node"] >= -1))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        out.bad += int((~ok).sum())
        if not out.why_bad:
            out.why_bad = _why(w[i])
        w = w[ok]
    r = np.empty(w.size, dtype=REPORT_DTYPE)
    for name in ("time_ns", "pid", "tid", "cpu", "node", "addr", "size", "mem"):
        r[name] = w[name]
    r["write"] = w["write"] != 0
    r["page_node"] = -1  # the session looks it up (wire version 1 does not carry it)
    src = w["source"]
    r["source"] = np.where(src == 0, EXTERNAL, src)  # 0 (a zeroed struct): external
    out.reports = r
    return out


def _why(rec) -> str:
    if int(rec["write"]) > 1:
        return f"write is {int(rec['write'])} (0 or 1)"
    if int(rec["source"]) >= len(SOURCES):
        return f"source {int(rec['source'])} is unknown (0..{len(SOURCES) - 1})"
    if int(rec["mem"]) >= len(MEM_LEVELS):
        return f"mem {int(rec['mem'])} is unknown (0..{len(MEM_LEVELS) - 1})"
    if int(rec["size"]) < 1:
        return "size is 0"
    if int(rec["addr"]) >= ADDR_END or int(rec["size"]) > ADDR_END - int(rec["addr"]):
        return f"addr {int(rec['addr']):#x} + size {int(rec['size'])} ends above {ADDR_END:#x}"
    return (f"pid {int(rec['pid'])} / tid {int(rec['tid'])} / cpu {int(rec['cpu'])} / "
            f"node {int(rec['node'])} out of range")
