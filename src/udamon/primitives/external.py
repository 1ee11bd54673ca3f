"""The ``external`` primitive: access reports pushed by other processes.

The user-space ``damon_report_access()`` for programs that see accesses with
their origin — perf or a BPF tool, a VMM that knows its guest's accesses, an
allocator.  They connect to a unix socket the session listens on (``--socket
PATH``) or write to its stdin (``--input -``) and send reports in the wire format
of :mod:`udamon.intake.wire` (binary records, or CSV lines); the reports keep
the source they name (``external`` by default), so they can later share a
session with other primitives and still be told apart.

Observational, coverage unknown: the producers, not udamon, decide what is
reported.  Reports carry their own CLOCK_MONOTONIC time; since a pipeline may
deliver them a little late, each aggregation interval is closed
``report_delay_ns`` after its end (reports later than that still count, in the
interval that is open when they arrive, and the record's ``late_reports`` says
how many did).  What producers dropped because the session did not keep up is
counted by them, sent in band, and written to the record (``lost_samples`` and
the end line's ``producers``).
"""

from __future__ import annotations

import os

import numpy as np

from udamon.intake.channel import ChannelServer, check_socket_path
from udamon.intake.reports import empty
from udamon.primitives.base import Primitive, PrimitiveStats
from udamon.targets.procmaps import is_alive

# How late a pipeline's reports may arrive and still count in their own interval.
# Measured here: bpftrace printing page faults into a pipe delivers them 1 ms after
# their time (median), 6-11 ms at most; 50 ms leaves room for a busier machine.
DEFAULT_REPORT_DELAY_NS = 50_000_000


# the record lists this many producers one by one; the rest are summed in one entry
# (a session that takes one short connection per report would list thousands)
MAX_LISTED = 100


def _listed(producers) -> list[dict]:
    out = [p.to_dict() for p in producers[:MAX_LISTED]]
    rest = producers[MAX_LISTED:]
    if rest:
        agg = {"name": f"({len(rest)} more producers)", "pid": -1, "uid": -1, "framing": "",
               "reports": 0, "dropped": 0, "bad": 0, "restamped": 0, "unread": 0}
        for p in rest:
            for k in ("reports", "dropped", "bad", "restamped", "unread"):
                agg[k] += getattr(p, k)
        errors = sum(1 for p in rest if p.error)
        if errors:
            agg["error"] = f"{errors} of them were disconnected (see the notes)"
        out.append(agg)
    return out


def external_available() -> tuple[bool, str]:
    return True, "reports from other programs (--socket PATH or --input -); needs no privileges"


class ExternalPrimitive(Primitive):
    name = "external"
    kind = "observational"
    coverage = "unknown"

    def __init__(self, socket_path: str | None = None, *, stdin: bool = False,
                 report_delay_ns: int = DEFAULT_REPORT_DELAY_NS) -> None:
        if socket_path is None and not stdin:
            raise ValueError("the external primitive needs a socket path or stdin")
        if socket_path is not None:
            check_socket_path(socket_path)  # a bad path is exit 2 before anything starts
        self.socket_path = socket_path
        self.stdin = stdin
        self.report_delay_ns = report_delay_ns
        self._server: ChannelServer | None = None
        self._pids: list[int] = []
        self._exited: set[int] = set()
        self._notes: list[str] = []
        self._stopped = False

    def start(self, pids: list[int]) -> None:
        self._pids = list(pids)
        self._server = ChannelServer(self.socket_path, stdin_fd=0 if self.stdin else None)
        if self.socket_path is not None:
            self._notes.append(
                f"listening for reports on {os.path.abspath(self.socket_path)} (mode 0600; "
                f"only uid {os.geteuid()} and root may report)")
        if self.stdin:
            self._notes.append("reading reports from stdin")

    def wait(self, timeout_s: float, wake_fd: int = -1) -> bool:
        if self._server is None:
            return super().wait(timeout_s, wake_fd)
        return self._server.wait(timeout_s, wake_fd)

    def poll(self, now_ns: int) -> np.ndarray:
        if self._server is None:
            return empty(0)
        return self._server.read()

    def exhausted(self) -> bool:
        """stdin alone ends the session at its end; a socket session runs on (producers
        come and go) until --duration, Ctrl-C or the targets' exit."""
        s = self._server
        return s is not None and self.socket_path is None and s.stdin_done

    def exited(self) -> list[int]:
        out = []
        for pid in self._pids:
            if pid not in self._exited and not is_alive(pid):
                self._exited.add(pid)
                out.append(pid)
        return out

    def stats(self) -> PrimitiveStats:
        s = self._server
        if s is None:
            return PrimitiveStats(notes=list(self._notes))
        notes = list(self._notes)
        warnings: list[str] = []
        lost = sum(p.dropped for p in s.producers)
        if not self._stopped:  # the producers' lines belong to the end of the session
            return PrimitiveStats(lost_samples=lost, notes=notes)
        for i, p in enumerate(s.producers):
            if i >= MAX_LISTED and not (p.dropped or p.bad or p.restamped or p.error or p.unread):
                continue  # the end line's aggregate has them
            who = p.framing or "nothing sent"
            if p.uid >= 0:
                who += f", uid {p.uid}"
            line = (f"producer {p.name} ({who}): "
                    f"{p.reports} reports, {p.dropped} dropped by the producer")
            if p.bad:
                line += f", {p.bad} refused ({p.why_bad})"
            if p.restamped:
                line += f", {p.restamped} with a time in the future (set to their arrival)"
            if p.unread:
                line += f", {p.unread} still unread when the session ended (not counted)"
            if p.error:
                line += f"; disconnected: {p.error}"
            notes.append(line)
            if p.dropped or p.bad or p.restamped or p.error or p.unread:
                warnings.append(line)
        for r in s.refused:
            line = f"refused a connection from pid {r['pid']}: {r['why']}"
            notes.append(line)
            warnings.append(line)
        if not s.producers:
            line = "no producer connected: no reports were received"
            notes.append(line)
            warnings.append(line)
        end = {"producers": _listed(s.producers)}
        if s.refused:
            end["refused_producers"] = list(s.refused)
        return PrimitiveStats(lost_samples=lost, notes=notes,
                              warnings=warnings, end=end)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            # what arrived after the last poll is in the socket buffers: the session
            # polled once more before calling stop, so only stragglers are left
            self._server.close()
