"""Prometheus metrics of a live session, updated every aggregation interval.

Per target: working set size and estimated write (dirty) rate of the last
aggregation; cumulative written bytes and bytes accessed by the CPUs of each
node (so that Prometheus' rate() works even for bursty primitives such as
hint, whose last aggregation is often empty), the node shares and the share
that hit pages on the accessing CPU's node (where page locations are
sampled); reports seen; per session: dropped reports and kernel-lost samples.
"Bytes" estimates weight each region by the fraction of sampling intervals it
was hit in (size x hits / max hits).

Per-target metrics carry ``pid`` and ``comm`` (the process's name, as its main
thread's comm read at the target's first snapshot).  Per thread (labels ``pid``,
``comm``, ``tid``, ``thread``: the thread's comm): accesses and their locality from
the snapshots' per-thread counts, and bytes accessed from ``thread:<tid>`` probes
(``--breakdown thread``); at most ``thread_labels`` threads per target get their own
label values, the rest are summed under ``other`` (udamon.report.thread_labels).

Cumulative values are Prometheus counters (``# TYPE ... counter``), so that
rate() and increase() treat them right; the HTTP server answers /metrics, an
index at /, and 404 for anything else.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

from udamon.core.locality import target_locality
from udamon.core.monitor import Monitor, Snapshot
from udamon.core.session import SessionResult
from udamon.report.thread_labels import DEFAULT_CAP, ThreadLabels


def hot_bytes(snap: Snapshot, counts: np.ndarray) -> float:
    """Size-weighted share of sampling intervals hit: bytes accessed per interval."""
    samples = max(snap.aggr_us // max(snap.sample_us, 1), 1)
    return float(((snap.end - snap.start).astype(np.float64) * counts / samples).sum())


class MetricsSink:
    def __init__(self, registry: CollectorRegistry | None = None,
                 thread_labels: int = DEFAULT_CAP):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        lp = ["pid", "comm"]
        lt = ["pid", "comm", "tid", "thread"]
        self.thread_accesses = Counter(
            "udamon_thread_accesses", "Accesses a thread made since the session started: "
            "reports of a known page node that passed the sample filters (a controlled "
            "primitive's sample counts its region's pages); at most --thread-labels "
            "threads per target, the rest under tid=\"other\"", lt, registry=r)
        self.thread_local = Gauge(
            "udamon_thread_local_access_ratio", "Share of a thread's accesses of known "
            "locality that hit a page on the accessing CPU's node, since the session "
            "started", lt, registry=r)
        self.thread_bytes = Counter(
            "udamon_thread_access_bytes", "Estimated bytes a thread accessed since the "
            "session started (thread:<tid> probes, --breakdown thread)", lt, registry=r)
        self._labels = ThreadLabels(thread_labels)
        self._comm: dict[int, str] = {}
        self._names: dict[int, str] = {}  # header targets: pid -> name
        self._thread_local: dict[tuple, list[float]] = {}
        self.wss = Gauge("udamon_wss_bytes", "Bytes of regions accessed in the last "
                         "aggregation interval (nr_accesses > 0)", lp, registry=r)
        self.write_rate = Gauge("udamon_write_bytes_per_second", "Estimated rate at which the "
                                "target dirties memory (needs a write probe or --write-only)",
                                lp, registry=r)
        # Counter names lose "_total" here; the exposition adds it back.
        self.written = Counter("udamon_written_bytes", "Estimated bytes written since the "
                               "session started (rate() gives the dirty rate)",
                               lp, registry=r)
        self.node_bytes = Counter("udamon_node_access_bytes", "Estimated bytes accessed by "
                                  "the CPUs of a node since the session started",
                                  ["pid", "comm", "node"], registry=r)
        self.node_share = Gauge("udamon_node_access_ratio", "Share of the target's accesses "
                                "made by the CPUs of a node, since the session started",
                                ["pid", "comm", "node"], registry=r)
        self.local_ratio = Gauge("udamon_local_access_ratio", "Share of the reports of "
                                 "known locality that hit a page on the accessing CPU's "
                                 "node (each report's page node), since the session started",
                                 lp, registry=r)
        self.reports = Gauge("udamon_reports", "Reports for the target in the last "
                             "aggregation interval", lp, registry=r)
        self.regions = Gauge("udamon_regions", "Number of regions", lp, registry=r)
        self.dropped = Counter("udamon_dropped_reports", "Reports the bounded buffer "
                               "could not take", registry=r)
        self.lost = Counter("udamon_lost_samples", "Events lost by the kernel before "
                            "udamon read them", registry=r)
        self.snapshots = Counter("udamon_snapshots", "Aggregation snapshots taken",
                                 registry=r)
        self.up = Gauge("udamon_session_up", "1 while the monitoring session runs",
                        registry=r)
        self._monitor: Monitor | None = None
        self._write: str | None = None
        self._nodes: dict[int, str] = {}
        self.server = None
        # cumulative per pid: node -> bytes; [local, located]
        self._node_tot: dict[str, dict[int, float]] = {}
        self._local: dict[str, list[float]] = {}
        self._dropped = 0  # the monitor's cumulative count already added to the counter

    def serve(self, addr: str, port: int) -> int:
        """Serve in a daemon thread; returns the port (``port`` 0: any free one)."""
        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO") or "/"
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/" and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
                start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
                return [_INDEX]
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: udamon serves /metrics\n"]

        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
        server_cls = type("_Server", (_ThreadingServer,), {"address_family": family})
        self.server = make_server(addr, port, app, server_cls, handler_class=_QuietHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_port)

    def stop_serving(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def begin(self, header: dict, monitor: Monitor) -> None:
        self._monitor = monitor
        names = [p["name"] for p in header["probes"]]
        self._write = "write" if "write" in names else None
        flt = header.get("filters", [])
        if self._write is None and len(flt) == 1 and flt[0]["type"] == "write" \
                and not flt[0]["allow"] and not flt[0]["matching"]:
            self._write = ""  # write-only sample filters: nr_accesses counts writes
        self._nodes = {int(m.group(1)): n for n in names
                       if (m := re.fullmatch(r"node:(\d+)", n))}
        self._thread_probes = {m.group(1): n for n in names
                               if (m := re.fullmatch(r"thread:(\d+)", n))}
        self._names = {int(t["pid"]): str(t.get("name", "")) for t in header.get("targets", [])}
        self.up.set(1)

    def snapshot(self, snap: Snapshot) -> None:
        comm = self._comm.get(snap.pid)
        if comm is None:  # fixed at the first snapshot: a label that moved would split series
            comm = self._comm[snap.pid] = ((snap.threads or {}).get(snap.pid)
                                           or self._names.get(snap.pid, ""))
        pid = (str(snap.pid), comm)
        size = (snap.end - snap.start).astype(np.float64)
        self.wss.labels(*pid).set(float(size[snap.nr_accesses > 0].sum()))
        aggr_s = max(snap.aggr_us, 1) / 1e6
        if self._write is not None:
            counts = snap.nr_accesses if self._write == "" else snap.probe_hits[self._write]
            written = hot_bytes(snap, counts)
            self.write_rate.labels(*pid).set(written / aggr_s)
            self.written.labels(*pid).inc(written)
        tot = self._node_tot.setdefault(pid, {})
        for n, name in self._nodes.items():
            b = hot_bytes(snap, snap.probe_hits[name])
            tot[n] = tot.get(n, 0.0) + b
            self.node_bytes.labels(*pid, str(n)).inc(b)
        total = sum(tot.values())
        for n, b in tot.items():
            self.node_share.labels(*pid, str(n)).set(b / total if total else 0.0)
        loc = target_locality(snap)  # exact report counts, or hits by page location
        if loc is not None and loc[1] > 0:
            acc = self._local.setdefault(pid, [0.0, 0.0])
            acc[0] += loc[0]
            acc[1] += loc[1]
            self.local_ratio.labels(*pid).set(acc[0] / acc[1])
        self._threads(snap, pid)
        self.reports.labels(*pid).set(snap.nr_reports)
        self.regions.labels(*pid).set(len(snap.start))
        self.snapshots.inc()
        if self._monitor is not None:
            self._count_dropped(self._monitor.stats.dropped)

    def _threads(self, snap: Snapshot, pid: tuple[str, str]) -> None:
        """Per-thread metrics under bounded label values (udamon.report.thread_labels)."""
        numa = (snap.numa or {}).get("threads", {})
        probe_bytes = {tid: hot_bytes(snap, snap.probe_hits[name])
                       for tid, name in self._thread_probes.items()}
        activity = {k: float(sum(v)) for k, v in numa.items()}
        for tid, b in probe_bytes.items():
            activity.setdefault(tid, 0.0)
            if not numa:
                activity[tid] += b
        # only threads with accesses in this snapshot (a counter without any stays as is)
        labels = self._labels.assign(snap.pid, {k: v for k, v in activity.items() if v > 0},
                                     snap.threads)
        for k, (tid, name) in labels.items():
            lv = (*pid, tid, name)
            if k in numa:
                local, remote, unknown = numa[k]
                self.thread_accesses.labels(*lv).inc(local + remote + unknown)
                acc = self._thread_local.setdefault(lv, [0.0, 0.0])
                acc[0] += local
                acc[1] += local + remote
                if acc[1]:
                    self.thread_local.labels(*lv).set(acc[0] / acc[1])
            if k in probe_bytes:
                self.thread_bytes.labels(*lv).inc(probe_bytes[k])

    def _count_dropped(self, total: int) -> None:
        if total > self._dropped:
            self.dropped.inc(total - self._dropped)
            self._dropped = total

    def end(self, res: SessionResult, monitor: Monitor, notes: list[str]) -> None:
        self._count_dropped(monitor.stats.dropped)
        self.lost.inc(max(res.lost_samples, 0))
        self.up.set(0)

    def fail(self, error: str) -> None:
        self.up.set(0)


_INDEX = (b"<html><head><title>udamon exporter</title></head><body><h1>udamon exporter</h1>"
          b'<p><a href="/metrics">metrics</a></p></body></html>\n')


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: the exporter's stderr is for udamon's own lines."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass
