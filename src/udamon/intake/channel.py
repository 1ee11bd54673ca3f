"""The live report channel: other processes push access reports into a running session.

``ChannelServer`` listens on a unix stream socket at a path the user gives (and/or
reads the session's stdin) and turns what producers send (udamon.intake.wire:
binary records or CSV lines) into REPORT_DTYPE batches.  It never blocks and
never grows without bound:

* reading happens when the session asks (``read``), at most ``budget`` bytes
  per producer per call, so a flooding producer cannot stall the session's
  aggregation intervals; meanwhile the kernel's socket buffer holds what is in
  flight.  A producer whose socket is full either waits (its choice) or drops
  and counts what it dropped, and tells the session in band (a drop notice), so
  every loss is counted per producer, exactly, and the record says so;
* who may report: the socket file is created mode 0600 (only its owner, the
  session's user, and root can connect), and every connection's peer
  credentials (SO_PEERCRED) are checked again: a uid other than the session's
  or root is refused and the refusal is noted;
* a producer that breaks the format (a binary stream out of step, a CSV line
  that does not parse) is disconnected and noted; the session goes on.  stdin
  is different: it is the user's own input, so a bad line there is bad input
  (``InputError``, exit 2), as for a replay file;
* a CSV line ``Lost N events`` is bpftrace's own note (on its stdout, between the
  producer's lines, whatever ``-q`` says) that its perf ring overflowed: N reports
  the producer lost, counted as its drops, never a bad line.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import InputError, ParameterError
from udamon.intake import wire
from udamon.intake.csv_format import is_comment, parse_header, parse_rows
from udamon.intake.reports import empty
from udamon.system.fdwait import wait_fds

# A producer's share of one read: bounds the time one call spends on one producer.
DEFAULT_BUDGET = 8 << 20
# The receive buffer the session asks the kernel for per connection (what a producer
# can have in flight while the session closes an aggregation interval).
RCVBUF = 4 << 20
MAX_LINE = 4096  # a CSV line longer than this is not a report
# bpftrace's note that its perf ring overflowed (TextOutput::lost_events, on stdout)
_BPFTRACE_LOST = re.compile(r"Lost (\d+) events")
_SOCKET_PATH_MAX = 107  # sizeof(sun_path) - 1


@dataclass
class Producer:
    """One connection (or stdin) and what it sent."""

    id: int
    name: str
    pid: int = -1  # from SO_PEERCRED (-1 for stdin)
    uid: int = -1
    framing: str = ""  # "binary" | "csv" once the first bytes told
    reports: int = 0  # reports taken into the session
    dropped: int = 0  # reports the producer says it dropped (its drop notices)
    bad: int = 0  # records refused (a field out of range)
    restamped: int = 0  # reports whose time was in the future (set to arrival)
    unread: int = 0  # reports still in the socket when the session ended (not counted)
    error: str = ""  # why it was disconnected, if it was
    why_bad: str = ""
    connected: bool = True
    # reading state
    sock: socket.socket | None = field(default=None, repr=False)
    fd: int = -1
    buf: bytearray = field(default_factory=bytearray, repr=False)
    fill: int = 0
    cols: list[str] | None = field(default=None, repr=False)
    lineno: int = 0

    def to_dict(self) -> dict:
        d = {"name": self.name, "pid": self.pid, "uid": self.uid, "framing": self.framing,
             "reports": self.reports, "dropped": self.dropped, "bad": self.bad,
             "restamped": self.restamped, "unread": self.unread}
        if self.error:
            d["error"] = self.error
        return d


class ChannelServer:
    """A unix socket (``path``) and/or stdin (``stdin_fd``) that producers report into."""

    def __init__(self, path: str | None = None, *, stdin_fd: int | None = None,
                 budget: int = DEFAULT_BUDGET, bufsize: int = 1 << 20,
                 clock=time.monotonic_ns) -> None:
        if path is None and stdin_fd is None:
            raise ValueError("a channel needs a socket path or stdin")
        self.path = path
        self.budget = budget
        self.bufsize = max(bufsize, 2 * MAX_LINE)
        self.clock = clock
        self.producers: list[Producer] = []
        self.refused: list[dict] = []  # connections refused (uid, pid, why)
        self._listen: socket.socket | None = None
        self._created = False
        self._stdin: Producer | None = None
        self._uid = os.geteuid()
        self._next_id = 0
        if path is not None:
            self._listen = self._bind(path)
        if stdin_fd is not None:
            self._stdin = self._new_producer("stdin", fd=stdin_fd)

    # -- setup ----------------------------------------------------------------

    def _bind(self, path: str) -> socket.socket:
        """A listening socket at ``path``, mode 0600."""
        if check_socket_path(path):
            os.unlink(path)  # a stale socket of a session that died
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: only the owner (and root) may connect
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            raise ParameterError("socket", "{param} {path}: cannot create it: {why}", path=path,
                                 why=e.strerror) from None
        finally:
            os.umask(old)
        self._created = True
        os.chmod(path, 0o600)
        s.listen(64)
        s.setblocking(False)
        return s

    def _new_producer(self, name: str, **kw) -> Producer:
        p = Producer(self._next_id, name, buf=bytearray(self.bufsize), **kw)
        self._next_id += 1
        self.producers.append(p)
        return p

    # -- waiting --------------------------------------------------------------

    def fds(self) -> list[int]:
        out = [p.fd for p in self.producers if p.connected]
        if self._listen is not None:
            out.append(self._listen.fileno())
        return out

    def wait(self, timeout_s: float, wake_fd: int = -1) -> bool:
        """Block until a producer (or a new connection) has something (True), ``wake_fd``
        (when >= 0) is readable, or the timeout passes."""
        return wait_fds(self.fds(), timeout_s, wake_fd)

    @property
    def stdin_done(self) -> bool:
        """stdin was given and has reached its end."""
        return self._stdin is not None and not self._stdin.connected

    # -- reading --------------------------------------------------------------

    def read(self) -> np.ndarray:
        """Every report that is waiting (up to ``budget`` bytes per producer)."""
        if self._listen is not None:
            self._accept()
        fds = [p.fd for p in self.producers if p.connected]
        if not fds:
            return empty(0)
        ready = self._ready(fds)
        parts: list[np.ndarray] = []
        for p in self.producers:
            if p.connected and p.fd in ready:
                parts.extend(self._drain(p))
        if not parts:
            return empty(0)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._stamp(out)
        return out

    def _ready(self, fds: list[int]) -> set[int]:
        pl = select.poll()
        for fd in fds:
            pl.register(fd, select.POLLIN)
        return {fd for fd, _ev in pl.poll(0)}

    def _stamp(self, out: np.ndarray) -> None:
        """time_ns 0 = now; a time in the future (a clock that is not CLOCK_MONOTONIC,
        or garbage) is set to now too, and counted per producer in ``_drain``."""
        t = out["time_ns"]
        now = self.clock()
        fix = (t == 0) | (t > now)
        if fix.any():
            t[fix] = now

    def _accept(self) -> None:
        assert self._listen is not None
        while True:
            try:
                conn, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._note_refusal(-1, -1, f"accept failed: {e.strerror}")
                    return
                raise
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid not in (self._uid, 0):
                try:
                    conn.send(wire.encode_reply(False, wire.REFUSE_PERMISSION))
                except OSError:
                    pass
                conn.close()
                self._note_refusal(pid, uid, f"uid {uid} is not the session's user "
                                             f"({self._uid}) nor root")
                continue
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            except OSError:
                pass
            p = self._new_producer(_comm(pid), pid=pid, uid=uid, sock=conn, fd=conn.fileno())
            p.name = f"{p.name}[{pid}]"

    def _note_refusal(self, pid: int, uid: int, why: str) -> None:
        self.refused.append({"pid": pid, "uid": uid, "why": why})

    def _drain(self, p: Producer) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        got = 0
        mv = memoryview(p.buf)
        while got < self.budget and p.connected:
            try:
                if p.sock is not None:
                    n = p.sock.recv_into(mv[p.fill:])
                else:
                    n = os.readv(p.fd, [mv[p.fill:]])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # ECONNRESET: the producer died; what it sent is in
                self._close(p, "" if e.errno == errno.ECONNRESET else e.strerror or str(e))
                break
            if n == 0:
                self._finish(p, out)
                break
            p.fill += n
            got += n
            self._consume(p, out)
            if p.sock is None:
                # stdin: one read per readiness (a pipe or file; never set O_NONBLOCK on
                # a descriptor the shell shares)
                if not self._ready([p.fd]):
                    break
        return out

    def _consume(self, p: Producer, out: list[np.ndarray]) -> None:
        if not p.framing and not self._detect(p):
            return
        if p.framing == "binary":
            self._consume_binary(p, out)
        else:
            self._consume_csv(p, out)

    def _detect(self, p: Producer) -> bool:
        """Which framing the first bytes are; False while they are too few to tell."""
        head = bytes(p.buf[: min(p.fill, len(wire.MAGIC))])
        if wire.MAGIC.startswith(head) and p.fill < wire.HELLO_SIZE:
            return False
        if head == wire.MAGIC:
            try:
                version, rsize, name = wire.parse_hello(bytes(p.buf[: wire.HELLO_SIZE]))
            except wire.WireError as e:
                self._refuse(p, wire.REFUSE_HELLO, f"bad hello: {e}")
                return False
            if version != wire.VERSION or rsize != wire.RECORD_SIZE:
                self._refuse(p, wire.REFUSE_VERSION,
                             f"wire version {version} / record size {rsize} (this session "
                             f"speaks version {wire.VERSION}, {wire.RECORD_SIZE}-byte records)")
                return False
            if name:
                p.name = f"{name}[{p.pid}]" if p.pid >= 0 else name
            if p.sock is not None:
                try:
                    p.sock.send(wire.encode_reply(True))
                except OSError:
                    pass
            p.framing = "binary"
            self._shift(p, wire.HELLO_SIZE)
            return True
        p.framing = "csv"
        return True

    def _consume_binary(self, p: Producer, out: list[np.ndarray]) -> None:
        n = p.fill // wire.RECORD_SIZE * wire.RECORD_SIZE
        if n == 0:
            return
        d = wire.decode(memoryview(p.buf)[:n])
        if d.drops_total is not None:
            p.dropped = max(p.dropped, d.drops_total)
        if d.bad:
            p.bad += d.bad
            p.why_bad = p.why_bad or d.why_bad
        self._take(p, d.reports, out)
        if d.out_of_step is not None:
            self._close(p, f"a record with another format version than {wire.VERSION} after "
                           f"{p.reports + p.bad} records: the stream is out of step")
            return
        self._shift(p, n)

    def _consume_csv(self, p: Producer, out: list[np.ndarray]) -> None:
        data = bytes(p.buf[: p.fill])
        cut = data.rfind(b"\n")
        if cut < 0:
            if p.fill >= MAX_LINE:
                self._bad_line(p, p.lineno + 1, f"a line longer than {MAX_LINE} bytes")
            return
        self._lines(p, data[: cut + 1].decode("utf-8", "replace").split("\n")[:-1], out)
        if p.connected:
            self._shift(p, cut + 1)

    def _lines(self, p: Producer, lines: list[str], out: list[np.ndarray]) -> None:
        where = "stdin" if p.sock is None else f"producer {p.name}"
        rows: list[str] = []
        linenos: list[int] = []
        for line in lines:
            p.lineno += 1
            if is_comment(line):
                continue
            lost = _BPFTRACE_LOST.fullmatch(line.strip())
            if lost:
                p.dropped += int(lost[1])
                continue
            if p.cols is None:
                try:
                    p.cols = parse_header(line, f"{where}:{p.lineno}")
                except InputError as e:
                    self._bad_line(p, p.lineno, str(e), formatted=True)
                    return
                continue
            rows.append(line)
            linenos.append(p.lineno)
        if not rows:
            return
        try:
            reps = parse_rows(where, rows, linenos, p.cols, len(p.cols))
        except InputError as e:
            if p.sock is not None:  # the lines before the bad one still count
                good = []
                for row, ln in zip(rows, linenos, strict=True):
                    try:
                        good.append(parse_rows(where, [row], [ln], p.cols, len(p.cols)))
                    except InputError:
                        break
                if good:
                    self._take(p, np.concatenate(good), out)
            self._bad_line(p, 0, str(e), formatted=True)
            return
        self._take(p, reps, out)

    def _bad_line(self, p: Producer, lineno: int, what: str, formatted: bool = False) -> None:
        msg = what if formatted else (f"stdin:{lineno}: {what}" if p.sock is None
                                      else f"producer {p.name}:{lineno}: {what}")
        if p.sock is None:
            raise InputError(msg)  # the user's own input: exit 2 as for a replay file
        self._close(p, msg)

    def _take(self, p: Producer, reps: np.ndarray, out: list[np.ndarray]) -> None:
        if reps.size == 0:
            return
        if p.framing == "csv" and "source" not in (p.cols or ()):
            reps["source"] = wire.EXTERNAL  # (replay's parser says "replay")
        t = reps["time_ns"]
        future = int((t > self.clock()).sum())
        if future:
            p.restamped += future
        p.reports += int(reps.size)
        out.append(reps)

    def _shift(self, p: Producer, n: int) -> None:
        rest = p.fill - n
        if rest:
            p.buf[:rest] = p.buf[n: p.fill]
        p.fill = rest

    def _finish(self, p: Producer, out: list[np.ndarray]) -> None:
        """End of stream: a CSV producer's last line may lack its newline."""
        if p.framing == "csv" and p.fill:
            tail = bytes(p.buf[: p.fill]).decode("utf-8", "replace")
            p.fill = 0
            self._lines(p, [tail], out)
        elif p.framing == "binary" and p.fill:
            p.bad += 1
            p.why_bad = p.why_bad or f"the stream ended inside a record ({p.fill} bytes)"
        elif not p.framing and p.fill:
            p.error = p.error or f"the stream ended after {p.fill} bytes, inside the hello"
        self._close(p, p.error)

    def _refuse(self, p: Producer, code: int, why: str) -> None:
        if p.sock is not None:
            try:
                p.sock.send(wire.encode_reply(False, code))
            except OSError:
                pass
        else:
            raise InputError(f"stdin: {why}")
        self._close(p, why)

    def _close(self, p: Producer, error: str) -> None:
        if not p.connected:
            return
        p.connected = False
        p.error = error or p.error
        if p.sock is not None:
            try:
                p.sock.close()
            except OSError:
                pass
        p.buf = bytearray()
        p.fill = 0

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and remove the socket file; producers' connections close.  What
        producers had sent but the session had not read yet is counted (``unread``)."""
        for p in self.producers:
            if p.sock is not None and p.connected:
                if p.framing == "binary":
                    p.unread = (_pending_bytes(p.sock) + p.fill) // wire.RECORD_SIZE
                self._close(p, p.error)
        if self._listen is not None:
            try:
                self._listen.close()
            finally:
                self._listen = None
                if self._created and self.path is not None:
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    self._created = False

    def __enter__(self) -> ChannelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_socket_path(path: str) -> bool:
    """UsageError (exit 2) when ``path`` cannot become the session's socket; True when a
    stale socket (nobody listening) is there and will be replaced."""
    if not path:
        raise ParameterError("socket", "{param} needs a path")
    if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
        raise ParameterError("socket", "{param} {path}: too long for a unix socket "
                             "({n} bytes, at most {most})", path=path,
                             n=len(os.fsencode(path)), most=_SOCKET_PATH_MAX)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ParameterError("socket", "{param} {path}: directory {parent} does not exist",
                             path=path, parent=parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ParameterError("socket", "{param} {path}: {why}", path=path,
                             why=e.strerror) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ParameterError("socket", "{param} {path}: exists and is not a socket (choose "
                             "another path)", path=path)
    if _someone_listens(path):
        raise ParameterError("socket", "{param} {path}: another session is listening there",
                             path=path)
    return True


def _pending_bytes(sock: socket.socket) -> int:
    import fcntl
    import termios

    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


def _someone_listens(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"
