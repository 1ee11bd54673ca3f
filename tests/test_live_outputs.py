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
pytestmark = pytest.mark.skipif(not _ok, reason=f"hint primitive unavailable: {_why}")


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


@pytest.mark.parametrize("kind", ["access", "heatmap", "wss", "ksm", "dirty", "sharing", "numa"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_report_works_on_a_live_record(live_record, kind, fmt):
    import json

    p = run_udamon("report", kind, "-i", str(live_record), "--format", fmt)
    assert p.returncode == 0, p.stderr
    if fmt == "json":
        json.loads(p.stdout)
    else:
        assert "not observed" in p.stdout or kind == "access" and "not observed" in p.stdout


def test_heatmap_png_of_a_live_record(live_record, tmp_path):
    out = tmp_path / "h.png"
    p = run_udamon("report", "heatmap", "-i", str(live_record), "--format", "png",
                   "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
