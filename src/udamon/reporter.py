"""Report accesses into a running udamon session from another program (Python client).

The session listens with ``udamon record --primitive external --socket PATH ...``;
a producer connects and reports::

    from udamon.reporter import Reporter

    with Reporter("/run/udamon.sock", name="my-allocator") as r:
        r.report(addr)                              # this thread, this CPU, now, a read
        r.report(addr, write=True, pid=guest_pid, tid=-1, cpu=3)
        r.report_batch(reports)                     # a numpy REPORT_DTYPE array
    # r.dropped: reports the session's socket had no room for (also told to the session)

By default a reporter never blocks its program: when the socket is full (the
session is behind) new reports are dropped and counted, and the count is sent to
the session in band, so its record says exactly how many were lost.
``block=True`` waits instead (nothing is dropped; the program slows down).

As a command, it forwards its stdin (CSV lines or binary records) to a session::

    bpftrace -q -e '...' | python -m udamon.reporter --socket /run/udamon.sock

The wire format is in udamon.intake.wire and docs/report-channel.md; the C client
is ``udamon_report.h`` (``python -m udamon.reporter --c-header`` prints its path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from udamon.intake import wire

__all__ = ["Refused", "Reporter", "C_HEADER"]

C_HEADER = Path(__file__).resolve().parent / "clients" / "udamon_report.h"

_REC = struct.Struct("<BBBBB3xqQQiiii")
assert _REC.size == wire.RECORD_SIZE
_EXTERNAL = 0  # a source of 0 is "external" on the wire

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
try:
    _sched_getcpu = _libc.sched_getcpu
    _sched_getcpu.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - glibc has it
    _sched_getcpu = None


def current_cpu() -> int:
    """The CPU this thread runs on now (-1 when unknown)."""
    return int(_sched_getcpu()) if _sched_getcpu is not None else -1


class Refused(ConnectionError):
    """The session would not take this producer's reports (or is not there)."""


class Reporter:
    """One connection to a session's report socket."""

    def __init__(self, path: str, name: str | None = None, *, block: bool = False,
                 connect_timeout: float = 5.0, buffer_reports: int = 4096,
                 source: str = "external") -> None:
        from udamon.intake.reports import SOURCE_IDS

        if source not in SOURCE_IDS:
            raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCE_IDS)})")
        self.path = path
        self.name = name or Path(sys.argv[0] or "python").name
        self.block = block
        self.source = SOURCE_IDS[source]
        self.sent = 0  # reports handed to the socket
        self.dropped = 0  # reports dropped because the socket was full (block=False)
        self._notified = 0  # the drop total the session was last told
        self._cap = max(1, buffer_reports) * wire.RECORD_SIZE
        self._out = bytearray()
        self._gone = False
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._sock = _connect(path, connect_timeout)
        try:
            self._sock.sendall(wire.encode_hello(self.name))
            reply = _recv_exact(self._sock, wire.REPLY_SIZE, connect_timeout)
            ok, why = wire.parse_reply(reply)
            if not ok:
                raise Refused(f"{path}: the session refused the reports: {why}")
            if not block:
                self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    # -- reporting ------------------------------------------------------------

    def report(self, addr: int, *, write: bool = False, size: int = 4096,
               pid: int | None = None, tid: int | None = None, cpu: int | None = None,
               node: int = -1, time_ns: int | None = None, mem: int = 0) -> bool:
        """One access (defaults: this process, this thread, this CPU, now).  Returns
        False when it was dropped (socket full, block=False)."""
        rec = _REC.pack(wire.VERSION, wire.KIND_REPORT, 1 if write else 0, self.source, mem,
                        time.monotonic_ns() if time_ns is None else time_ns, addr, size,
                        self._pid if pid is None else pid,
                        threading.get_native_id() if tid is None else tid,
                        current_cpu() if cpu is None else cpu, node)
        return self._enqueue(rec, 1) == 1

    def report_batch(self, reports) -> int:
        """A numpy REPORT_DTYPE array (udamon.make_reports); returns how many were taken
        (the rest were dropped and counted)."""
        import numpy as np

        from udamon.intake.reports import REPORT_DTYPE

        if not isinstance(reports, np.ndarray) or reports.dtype != REPORT_DTYPE:
            raise TypeError("reports must be a numpy array of udamon.REPORT_DTYPE")
        return self._enqueue(wire.encode(reports), int(reports.size))

    def send_raw(self, data: bytes, n: int) -> int:
        """``n`` records already in the wire format (e.g. from a shared buffer)."""
        if len(data) != n * wire.RECORD_SIZE:
            raise ValueError(f"{len(data)} bytes is not {n} records of {wire.RECORD_SIZE}")
        return self._enqueue(data, n)

    @property
    def connected(self) -> bool:
        """False once the session has gone (every report after that is dropped)."""
        return not self._gone

    def _enqueue(self, data: bytes, n: int) -> int:
        with self._lock:
            if self._gone:
                self.dropped += n
                return 0
            if self.block:
                try:
                    self._sock.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    self._lose_session()
                    self.dropped += n
                    return 0
                self.sent += n
                return n
            if len(self._out) + len(data) > self._cap:
                self._flush_some()
            room = (self._cap - len(self._out)) // wire.RECORD_SIZE
            take = min(n, room)
            if take < n:
                self.dropped += n - take
            if take:
                if self._notified != self.dropped and room > take:
                    self._out += wire.encode_drops(self.dropped)
                    self._notified = self.dropped
                self._out += data[: take * wire.RECORD_SIZE]
                self.sent += take
            if len(self._out) >= self._cap // 2:
                self._flush_some()
            return take

    def _flush_some(self) -> None:
        """Send what the socket takes now; keep the rest (never a partial record lost)."""
        while self._out:
            try:
                k = self._sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                self._lose_session()
                return
            del self._out[:k]

    def _lose_session(self) -> None:
        """The session ended (or died): never an error for the program that reports;
        what was queued and everything after is counted as dropped."""
        self._gone = True
        lost = len(self._out) // wire.RECORD_SIZE
        self.sent -= lost
        self.dropped += lost
        self._out.clear()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered, waiting up to ``timeout`` s (None: as long as it
        takes); True when all was sent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._gone:
                return False
            if self.block:
                return True
            if self._notified != self.dropped:
                self._out += wire.encode_drops(self.dropped)
                self._notified = self.dropped
            while self._out and not self._gone:
                self._flush_some()
                if not self._out:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                select.select([], [self._sock], [], left)
        return not self._gone

    def close(self, timeout: float = 5.0) -> int:
        """Flush (waiting up to ``timeout`` s), tell the session the final drop count,
        close; returns the number of reports dropped."""
        if self._sock.fileno() < 0:
            return self.dropped
        try:
            if not self.block:
                if not self.flush(timeout) and not self._gone:
                    # what could not be sent in time is lost too: count it, and try once
                    # more to say so
                    with self._lock:
                        lost = len(self._out) // wire.RECORD_SIZE
                        self.sent -= lost
                        self.dropped += lost
                        self._out.clear()
                    self.flush(0.5)
            elif self._notified != self.dropped and not self._gone:
                self._sock.sendall(wire.encode_drops(self.dropped))
        except OSError:
            pass
        finally:
            self._sock.close()
        return self.dropped

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect, retrying while the session is still starting (no socket yet)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # room for what is in flight while the session closes an interval (the kernel
            # caps it at net.core.wmem_max)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.connect(path)
            return s
        except OSError as e:
            s.close()
            if e.errno == errno.EACCES:
                raise Refused(f"{path}: permission denied (only the session's user and "
                              "root may report)") from None
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() > deadline:
                raise Refused(f"{path}: cannot connect: {e.strerror} (is a session running "
                              "with --primitive external --socket PATH?)") from None
            time.sleep(0.05)


def _recv_exact(s: socket.socket, n: int, timeout: float) -> bytes:
    s.settimeout(timeout)
    buf = b""
    try:
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        pass
    finally:
        s.settimeout(None)
    return buf


def _forward(path: str, connect_timeout: float) -> int:
    """stdin -> the session's socket, as it comes (blocking: a pipeline waits)."""
    s = _connect(path, connect_timeout)
    n = 0
    try:
        fd = sys.stdin.fileno()
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            s.sendall(data)
            n += len(data)
    except BrokenPipeError:
        raise Refused(f"{path}: the session closed the connection after {n} bytes "
                      "(refused, or it ended)") from None
    finally:
        s.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m udamon.reporter",
        description="Forward reports on stdin (CSV lines with a header, or binary records "
                    "after a hello) to a udamon session's --socket, e.g. "
                    "bpftrace -q -e '...' | python -m udamon.reporter --socket PATH")
    p.add_argument("--socket", metavar="PATH", help="the session's --socket")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                   help="wait this long for the session's socket to appear (default 5)")
    p.add_argument("--c-header", action="store_true",
                   help="print the path of the C client header (udamon_report.h) and exit")
    a = p.parse_args(argv)
    if a.c_header:
        print(C_HEADER)
        return 0
    if not a.socket:
        print("udamon.reporter: error: --socket PATH is required", file=sys.stderr)
        return 2
    try:
        return _forward(a.socket, a.connect_timeout)
    except Refused as e:
        print(f"udamon.reporter: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
