"""Live outputs of a real session: the terminal view and the Prometheus exporter
(scraped over HTTP on 127.0.0.1 while the session runs)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import run_udamon, start_workload

from udamon.primitives.hint import hint_available

_ok, _why = hint_available()
needs_hint = pytest.mark.skipif(not _ok, reason=f"hint primitive unavailable: {_why}")


@needs_hint
def test_monitor_shows_hottest_regions(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "8")
    try:
        rec = tmp_path / "m.jsonl"
        p = run_udamon("monitor", "--primitive", "hint", "--pid", str(info["pid"]),
                       "--breakdown", "cpu", "--duration", "4s", "--top", "3",
                       "-o", str(rec), timeout=60)
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0
    assert p.returncode == 0, p.stderr
    assert "udamon monitor: primitive hint" in p.stdout
    assert "ended: duration" in p.stdout
    assert rec.exists()


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.fullmatch(rf"{name}(\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(3))
    return None


@needs_hint
def test_exporter_serves_metrics_while_monitoring(tmp_path, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "60", "--size", "8")
    ex = subprocess.Popen([sys.executable, "-m", "udamon", "exporter", "--primitive", "hint",
                           "--pid", str(info["pid"]), "--port", "0", "-q"],
                          stderr=subprocess.PIPE, text=True)
    try:
        line = ex.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}/metrics"
        pid = info["pid"]
        deadline = time.time() + 20
        seen_node = False
        while time.time() < deadline:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            snaps = metric(text, "udamon_snapshots_total") or 0
            if snaps >= 20 and metric(text, "udamon_node_access_bytes_total", pid=pid, node=0):
                seen_node = True
                break
            time.sleep(0.5)
        for name in COUNTERS:
            assert is_counter(text, name), name
        time.sleep(1.0)
        later = urllib.request.urlopen(url, timeout=5).read().decode()
        assert metric(later, "udamon_snapshots_total") > metric(text, "udamon_snapshots_total")
        for name, labels in (("udamon_written_bytes_total", {"pid": pid}),
                             ("udamon_node_access_bytes_total", {"pid": pid, "node": 0}),
                             ("udamon_dropped_reports_total", {}),
                             ("udamon_lost_samples_total", {})):
            assert metric(later, name, **labels) >= metric(text, name, **labels), name
        assert metric(text, "udamon_session_up") == 1.0
        assert metric(text, "udamon_regions", pid=pid) >= 1
        assert metric(text, "udamon_wss_bytes", pid=pid) is not None
        assert metric(text, "udamon_write_bytes_per_second", pid=pid) is not None
        assert metric(text, "udamon_written_bytes_total", pid=pid) > 0
        assert metric(text, "udamon_dropped_reports_total") == 0
        assert metric(text, "udamon_lost_samples_total") is not None
        assert seen_node, "no node-attributed accesses within 20 s"
        from udamon.targets.topology import cpu_to_node

        if len({n for n in cpu_to_node().tolist() if n >= 0}) == 1:  # one node: all on node 0
            assert metric(text, "udamon_node_access_ratio", pid=pid, node=0) == 1.0
            assert metric(text, "udamon_local_access_ratio", pid=pid) == 1.0
        ex.send_signal(signal.SIGTERM)
        assert ex.wait(15) == 0
    finally:
        if ex.poll() is None:
            ex.kill()
            ex.wait()
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0


COUNTERS = ("udamon_written_bytes_total", "udamon_node_access_bytes_total",
            "udamon_dropped_reports_total", "udamon_lost_samples_total",
            "udamon_snapshots_total")


def is_counter(text: str, name: str) -> bool:
    """The exposition types ``name`` as a counter (text format: full name; OpenMetrics:
    the name without _total)."""
    return bool(re.search(rf"^# TYPE {name.removesuffix('_total')}(_total)? counter$", text,
                          re.M))


def _snapshots(n: int):
    """``n`` aggregation snapshots of a small monitor fed with writes from CPU 1."""
    import numpy as np

    import udamon
    from udamon import Attrs, Monitor, Probe

    ms = 1_000_000
    base = 0x4000_0000
    mon = Monitor(Attrs(min_nr_regions=3, max_nr_regions=6),
                  probes=[Probe.parse("write=write"), Probe.parse("node:0=cpus:1")], seed=1)
    mon.add_target(5, [(base, base + 64 * 4096)], name="t")
    mon.start(0)
    out = []
    for k in range(n):
        mon.report_batch(udamon.make_reports(
            time_ns=k * 100 * ms + np.arange(50) * 2 * ms, pid=5,
            addr=base + 4096 * (np.arange(50) % 64), cpu=1, write=True))
        out += mon.advance((k + 1) * 100 * ms)
    return mon, out


def test_exporter_counters_are_counters_and_only_metrics_is_served():
    import urllib.error

    from udamon.core.session import SessionResult
    from udamon.report.exporter import MetricsSink

    mon, snaps = _snapshots(4)
    sink = MetricsSink()
    port = sink.serve("127.0.0.1", 0)
    try:
        sink.begin({"probes": [{"name": "write"}, {"name": "node:0"}], "filters": []}, mon)
        url = f"http://127.0.0.1:{port}"
        scrapes = []
        for half in (snaps[:2], snaps[2:]):
            for s in half:
                sink.snapshot(s)
            scrapes.append(urllib.request.urlopen(url + "/metrics", timeout=5).read().decode())
        first, second = scrapes
        for name in COUNTERS:
            assert is_counter(first, name) and f"# TYPE {name} gauge" not in first, name
        assert "# TYPE udamon_wss_bytes gauge" in first
        assert metric(second, "udamon_snapshots_total") == 4.0
        assert metric(first, "udamon_snapshots_total") == 2.0
        for name, labels in (("udamon_written_bytes_total", {"pid": 5}),
                             ("udamon_node_access_bytes_total", {"pid": 5, "node": 0})):
            assert 0 < metric(first, name, **labels) < metric(second, name, **labels), name
        sink.end(SessionResult("duration", 4, 7), mon, [])
        final = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert metric(final, "udamon_lost_samples_total") == 7.0
        assert urllib.request.urlopen(url + "/", timeout=5).status == 200
        for path in ("/nope", "/metricsx", "/favicon.ico", "/metrics/extra"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path, timeout=5)
            assert e.value.code == 404, path
    finally:
        sink.stop_serving()


def test_monitor_view_prints_intervals_like_the_other_commands():
    import io

    from rich.console import Console

    from udamon.report.live_view import LiveView

    mon, snaps = _snapshots(1)
    out = io.StringIO()
    view = LiveView(console=Console(file=out, width=120))
    view.begin({"primitive": "wp", "coverage": "controlled", "probes": [],
                "attrs": {"sample_us": 50_000, "aggr_us": 1_000_000}}, mon)
    view.fail("test over")
    assert "sample 50 ms, aggr 1 s," in out.getvalue()


def test_exporter_binds_loopback_by_default():
    p = run_udamon("exporter", "--help")
    assert "default 127.0.0.1" in p.stdout


@pytest.fixture(scope="module")
def live_record(tmp_path_factory, access_pattern_bin):
    wl, info = start_workload(access_pattern_bin, "--duration", "30", "--size", "8")
    try:
        rec = tmp_path_factory.mktemp("live") / "live.jsonl"
        run_udamon("record", "--primitive", "hint", "--pid", str(info["pid"]),
                   "--breakdown", "cpu,node,thread,rw", "--duration", "4s", "-q",
                   "-o", str(rec), timeout=60, check=True)
    finally:
        wl.send_signal(signal.SIGTERM)
        assert wl.wait(10) == 0
    return rec


@needs_hint
@pytest.mark.parametrize("kind", ["access", "heatmap", "wss", "ksm", "dirty", "sharing", "numa"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_report_works_on_a_live_record(live_record, kind, fmt):
    import json

    p = run_udamon("report", kind, "-i", str(live_record), "--format", fmt)
    assert p.returncode == 0, p.stderr
    if fmt == "json":
        json.loads(p.stdout)
    else:
        # a hint record's coverage is unknown: every text report says a quiet region
        # was not observed rather than not accessed
        assert "not observed" in p.stdout, (kind, p.stdout[:500])


@needs_hint
def test_heatmap_png_of_a_live_record(live_record, tmp_path):
    out = tmp_path / "h.png"
    p = run_udamon("report", "heatmap", "-i", str(live_record), "--format", "png",
                   "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
