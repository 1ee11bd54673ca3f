"""The dirty-rate estimator on real processes with a known rate, and its statistics.

Ground truth: tests/workloads/dirtier.c writes RATE random pages per second and
prints, per 1 s window, the distinct pages it wrote (and those of its own
bookkeeping): the quantity QEMU's calc-dirty-rate estimates.  The VM version of
these checks (three QEMU guests, QEMU's own figure beside) is
tests/test_dirty_vm.py.  Live tests need root, x86_64, gcc and WP_ASYNC.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from udamon.primitives.dirty_sample import PAGE, PartWindow, TargetWindow, sample_size
from udamon.primitives.uffd import wp_available
from udamon.report import precopy
from udamon.report.dirty_rate import TargetSeries, combine, compute, part_rate
from udamon.report.intervals import t_quantile, wilson, z_quantile
from udamon.targets import vmm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_udamon  # noqa: E402
from workloads.build import BuildError, build  # noqa: E402

_root = os.geteuid() == 0
_wp, _why = wp_available() if _root else (False, "not root")
needs_wp = pytest.mark.skipif(not (_root and _wp), reason=f"needs root and wp: {_why}")


# -- statistics, on constructed windows -----------------------------------------------


def test_t_and_z_quantiles_match_the_tables():
    assert z_quantile(0.95) == pytest.approx(1.95996, abs=1e-4)
    table = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}
    for dof, t in table.items():
        assert t_quantile(0.95, dof) == pytest.approx(t, abs=2e-4)
    assert t_quantile(0.99, 4) == pytest.approx(4.6041, abs=2e-4)


def test_wilson_is_exact_for_a_census_and_wider_for_few_hits():
    assert wilson(5, 100, 0.95, fpc=0) == (0.05, 0.05)
    lo, hi = wilson(0, 100, 0.95)
    assert lo == 0 and 0.03 < hi < 0.045
    a = wilson(5, 100, 0.95)
    b = wilson(5, 100, 0.95, fpc=0.5)
    assert a[0] < b[0] < 0.05 < b[1] < a[1]


def _window(rng, frame: int, dirty: int, n: int, secs: float = 1.0) -> PartWindow:
    """A sampled window of a frame with ``dirty`` dirtied pages (hypergeometric)."""
    d = int(rng.hypergeometric(dirty, frame - dirty, n)) if n < frame else dirty
    return PartWindow("memory", frame, n, d, 0, n >= frame, 0, int(secs * 1e9))


@pytest.mark.parametrize("frame,dirty", [(34816, 200), (34816, 2000), (34816, 15000),
                                         (4 << 20, 2000), (4 << 20, 200000)])
def test_interval_covers_the_truth_at_its_confidence(frame, dirty):
    """Sampled windows of a known frame (136 MiB; 16 GiB, where the sample is capped),
    sized by sample_size as the estimator does: the 95 % interval covers the true
    rate in >= 93 % of 300 repetitions (seeded)."""
    rng = np.random.default_rng(dirty + frame)
    truth = dirty * PAGE
    covered = 0
    for _ in range(300):
        hits = looked = 0
        wins = []
        for k in range(4):
            n = sample_size(frame, hits, looked)
            pw = _window(rng, frame, dirty + int(rng.normal(0, 3)), n)
            hits, looked = hits + pw.dirtied, looked + pw.sampled
            wins.append(TargetWindow(1, k * 10**9, (k + 1) * 10**9, [pw]))
        pr = part_rate("memory", wins, 0.95)
        covered += pr.low_bps <= truth <= pr.high_bps
    assert covered >= 0.93 * 300


def test_small_first_window_weighs_little():
    """A pilot window of 256 pages that saw twice the rate must not drag the
    estimate: precision-weighted, not a plain mean."""
    big = [PartWindow("m", 16384, 11000, 140, 0, False, 0, 10**9) for _ in range(3)]
    pilot = PartWindow("m", 16384, 256, 6, 0, False, 0, 10**9)
    wins = [TargetWindow(1, i, i + 10**9, [p]) for i, p in enumerate([pilot, *big])]
    pr = part_rate("m", wins, 0.95)
    plain = np.mean([140 / 11000 * 16384 * PAGE] * 3 + [6 / 256 * 16384 * PAGE])
    assert pr.mean_bps < 0.9 * plain
    assert pr.mean_bps == pytest.approx(140 / 11000 * 16384 * PAGE, rel=0.05)


def test_combine_widens_with_window_to_window_change():
    steady = combine([100.0, 101.0, 99.0, 100.0], [1.0] * 4, 0.95)
    moving = combine([60.0, 140.0, 80.0, 120.0], [1.0] * 4, 0.95)
    assert steady[2] - steady[1] < 10 < moving[2] - moving[1]
    assert moving[1] < 100 < moving[2]


def test_sample_size_like_qemu_then_what_the_share_needs():
    gib = (1 << 30) // PAGE
    assert sample_size(gib, 0, 0) == 512  # QEMU's 512 pages per GiB, first window
    assert sample_size(1000, 0, 0) == 256  # at least MIN_SAMPLE
    assert sample_size(100, 0, 0) == 100
    # 10 % dirtied: a 3 % relative error needs 10000 pages, corrected for the frame
    n = sample_size(gib, 500, 5000)
    need = 0.9 / (0.1 * 0.03 ** 2)
    assert n == math.ceil(need / (1 + need / gib))
    assert sample_size(gib, 0, 512) > 10 * 512  # nothing seen: the upper bound sizes it
    assert sample_size(10 * gib, 1, 10**6) == 65536  # capped


def test_ranking_slowest_first_and_precopy_model():
    def series(pid, d):
        ws = [TargetWindow(pid, k * 10**9, (k + 1) * 10**9,
                           [PartWindow("memory", 32768, 32768, d, 0, True, 0, 10**9)])
              for k in range(4)]
        return TargetSeries(pid, f"p{pid}", "memory", ws)

    res = compute([series(1, 15000), series(2, 200), series(3, 2000)], window_ns=10**9,
                  bandwidth_bps=100 * (1 << 20))
    assert [t.pid for t in res.targets] == [2, 3, 1]
    fast = res.targets[2].precopy
    # 58.6 MiB/s against 100 MiB/s: converges (ratio 0.586); check the rounds by hand
    mem, rate, bw, thr = 32768 * PAGE, 15000 * PAGE, 100 * (1 << 20), 100 * (1 << 20) * 0.3
    pending, total, rounds = mem, 0.0, 0
    while pending > thr:
        t = pending / bw
        total, rounds, pending = total + t, rounds + 1, min(rate * t, mem)
    assert fast["converges"] and fast["rounds"] == rounds
    assert fast["total_ns"] == pytest.approx((total + pending / bw) * 1e9, rel=1e-6)
    assert fast["downtime_ns"] <= 300_000_000
    slow = precopy.estimate(mem, 200 * (1 << 20), 100 * (1 << 20))
    assert not slow.converges and slow.total_ns == -1


def test_parse_rate():
    from udamon.cli.dirty_rate import parse_rate

    assert parse_rate("10Gbit/s") == 10e9 / 8
    assert parse_rate("1gbps") == 1e9 / 8
    assert parse_rate("1GiB/s") == 1 << 30
    assert parse_rate("125MiB/s") == 125 << 20
    for bad in ("fast", "10", "0Gbit/s", "-1MiB/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


# -- VMM guest RAM, on constructed /proc/PID/smaps ------------------------------------


def _smaps(rows: list[tuple[int, int, str, str, str]]) -> str:
    out = []
    for lo, hi, perms, path, flags in rows:
        out.append(f"{lo:x}-{hi:x} {perms} 00000000 00:00 0 {path}".rstrip())
        out.append("Rss:                   4 kB")
        out.append(f"VmFlags: rd {flags}")
    return "\n".join(out) + "\n"


M = 1 << 20


def test_vmm_rules_on_constructed_maps():
    base = 0x7F0000000000
    qemu = vmm.parse_smaps(_smaps([
        (base, base + 800 * M, "rw-p", "", "wr mr mw me dc ac hg"),  # pc.ram
        (base + 900 * M, base + 902 * M, "rw-p", "", "wr mr mw me dc ac hg"),  # ROMs
        (base + 1000 * M, base + 2023 * M, "rwxp", "", "wr ex mr mw me ac hg"),  # TCG code
        (base + 3000 * M, base + 3014 * M, "rw-p", "[heap]", "wr mr mw me ac"),
        (base + 4000 * M, base + 4064 * M, "rw-p", "", "wr mr mw me ac"),  # malloc arena
    ]))
    info = vmm.detect_from("qemu", qemu)
    assert info.ram == ((base, base + 800 * M), (base + 900 * M, base + 902 * M))
    fc = vmm.parse_smaps(_smaps([
        (base, base + 4096, "---p", "", "mr mw me"),
        (base + 4096, base + 4096 + 512 * M, "rw-p", "", "wr mr mw me ac"),
        (base + 4096 + 512 * M, base + 8192 + 512 * M, "---p", "", "mr mw me"),
        (base + 600 * M, base + 664 * M, "rw-p", "", "wr mr mw me ac"),  # its heap arena
        (base + 700 * M, base + 708 * M, "rw-p", "", "wr mr mw me ac"),
    ]))
    info = vmm.detect_from("firecracker", fc)
    assert info.ram == ((base + 4096, base + 4096 + 512 * M),)
    ch = vmm.parse_smaps(_smaps([
        (base, base + 1024 * M, "rw-s", "/memfd:ch_ram (deleted)", "wr sh mr mw me ms"),
        (base + 2000 * M, base + 2064 * M, "rw-p", "", "wr mr mw me ac"),
    ]))
    assert vmm.detect_from("cloud-hypervisor", ch).ram == ((base, base + 1024 * M),)
    # a VMM built differently: the big anonymous mappings, and the output says so
    other = vmm.parse_smaps(_smaps([
        (base, base + 256 * M, "rw-p", "", "wr mr mw me ac"),
        (base + 300 * M, base + 302 * M, "rw-p", "", "wr mr mw me ac"),
    ]))
    info = vmm.detect_from("qemu", other)
    assert info.ram == ((base, base + 256 * M),) and "no mapping matched" in info.how
    assert vmm.kind_of("qemu-system-x86", "/usr/bin/qemu-system-x86_64") == "qemu"
    assert vmm.kind_of("cloud-hyperviso", "") == "cloud-hypervisor"
    assert vmm.kind_of("bash", "/bin/bash") is None


# -- live, against the dirtier --------------------------------------------------------


@pytest.fixture(scope="module")
def dirtier():
    try:
        return build("dirtier")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


class Dirtier:
    def __init__(self, binary: str, rate: int, mib: int = 128, seed: int = 1) -> None:
        self.p = subprocess.Popen([binary, "--rate", str(rate), "--mib", str(mib),
                                   "--seed", str(seed)], stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())
        self.rate = rate
        self.windows: list[dict] = []

    @property
    def pid(self) -> int:
        return self.p.pid

    def collect(self) -> None:
        """Every window line printed so far (the pipe is read without blocking)."""
        os.set_blocking(self.p.stdout.fileno(), False)
        while True:
            line = self.p.stdout.readline()
            if not line:
                break
            obj = json.loads(line)
            if "window" in obj:
                self.windows.append(obj)
        os.set_blocking(self.p.stdout.fileno(), True)

    def truth_bps(self, first: int) -> float:
        ws = self.windows[first:]
        return float(np.mean([w["distinct"] + w["own"] for w in ws])) * PAGE

    def check(self) -> bool:
        self.collect()
        os.kill(self.pid, signal.SIGUSR1)
        while True:
            obj = json.loads(self.p.stdout.readline())
            if "ok" in obj:
                return obj["ok"]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture
def three(dirtier):
    ds = [Dirtier(dirtier, r, seed=i + 1) for i, r in enumerate((20000, 200, 2000))]
    time.sleep(1.2)
    yield ds
    for d in ds:
        d.stop()


def _run(ds, *extra, timeout=120):
    for d in ds:
        d.collect()
    first = {d.pid: len(d.windows) for d in ds}
    p = run_udamon("dirty-rate", "--pid", ",".join(str(d.pid) for d in ds), "--format",
                   "json", "-q", *extra, timeout=timeout)
    assert p.returncode == 0, p.stderr
    time.sleep(1.1)  # the window the run ended in
    for d in ds:
        d.collect()
    return json.loads(p.stdout), first


@needs_wp
def test_three_processes_ranked_within_truth(three):
    doc, first = _run(three)
    assert doc["definition"].startswith("distinct pages dirtied per window")
    assert doc["window_ns"] == 10**9
    ts = doc["targets"]
    by_rate = {d.pid: d for d in three}
    assert [by_rate[t["pid"]].rate for t in ts] == [200, 2000, 20000]
    assert [t["rank"] for t in ts] == [1, 2, 3]
    for t in ts:
        d = by_rate[t["pid"]]
        truth = d.truth_bps(first[d.pid])
        assert truth / 1.25 <= t["mean_bps"] <= truth * 1.25, (d.rate, t["mean_bps"], truth)
        assert t["interval"]["low_bps"] <= truth <= t["interval"]["high_bps"], (d.rate, t)
        assert t["converged"] and t["converged_after_ns"] <= 6_000_000_000
        assert t["rate_of"] == "memory" and t["vmm"] is None
    assert doc["end"] == "converged"
    for d in three:
        assert d.check(), "the target's data changed"


@needs_wp
def test_exact_mode_counts_every_page(dirtier):
    d = Dirtier(dirtier, 3000, mib=64)
    try:
        time.sleep(1.2)
        doc, first = _run([d], "--exact", "--duration", "4s", "--precision", "0")
        (t,) = doc["targets"]
        assert doc["method"] == "dirty-exact" and t["windows"] >= 3
        (part,) = t["parts"]
        assert part["exact_windows"] == part["windows"]
        truth = d.truth_bps(first[d.pid])
        assert abs(t["mean_bps"] / truth - 1) < 0.03, (t["mean_bps"], truth)
        assert d.check()
    finally:
        d.stop()


@needs_wp
def test_range_override_and_record_roundtrip(dirtier, tmp_path):
    d = Dirtier(dirtier, 2000, mib=64)
    rec = tmp_path / "dirty.jsonl"
    try:
        time.sleep(1.2)
        lo, n = d.info["addr"], d.info["len"]
        doc, first = _run([d], "--range", f"{d.pid}:{lo:#x}-{lo + n:#x}", "-o", str(rec),
                          "--bandwidth", "1Gbit/s")
        (t,) = doc["targets"]
        assert t["rate_of"] == "range"
        names = {p["name"]: p for p in t["parts"]}
        assert set(names) == {"range", "rest"}
        # the range is the buffer: its rate is the distinct buffer pages, without "own"
        truth = float(np.mean([w["distinct"] for w in d.windows[first[d.pid]:]])) * PAGE
        assert truth / 1.25 <= t["mean_bps"] <= truth * 1.25
        assert names["rest"]["mean_bps"] < 0.2 * t["mean_bps"]
        assert t["precopy"]["converges"] and t["precopy"]["memory_bytes"] >= n
        p = run_udamon("report", "dirty", "-i", str(rec), "--format", "json",
                       "--bandwidth", "1Gbit/s")
        assert p.returncode == 0, p.stderr
        again = json.loads(p.stdout)
        (t2,) = again["targets"]
        assert t2["mean_bps"] == pytest.approx(t["mean_bps"])
        assert t2["interval"] == pytest.approx(t["interval"])
        assert t2["precopy"] == t["precopy"]
        text = run_udamon("report", "dirty", "-i", str(rec), "--bandwidth", "100MiB/s")
        assert text.returncode == 0 and "pre-copy live migration" in text.stdout
        assert "QEMU's calc-dirty-rate definition" in text.stdout
    finally:
        d.stop()


@needs_wp
def test_target_exits_during_the_run(dirtier):
    a, b = Dirtier(dirtier, 500, mib=16), Dirtier(dirtier, 500, mib=16, seed=2)
    try:
        u = subprocess.Popen([sys.executable, "-m", "udamon", "dirty-rate", "--pid",
                              f"{a.pid},{b.pid}", "--precision", "0", "--duration", "5s",
                              "--format", "json", "-q"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(2.5)
        a.p.kill()
        out, err = u.communicate(timeout=60)
        assert u.returncode == 0, err
        assert f"process {a.pid} exited" in err
        doc = json.loads(out)
        by = {t["pid"]: t for t in doc["targets"]}
        assert by[b.pid]["windows"] >= 4 and by[a.pid]["windows"] <= 3
    finally:
        a.stop()
        b.stop()


@needs_wp
def test_sigkill_leaves_the_target_running_with_its_data(dirtier):
    d = Dirtier(dirtier, 5000, mib=32)
    try:
        u = subprocess.Popen([sys.executable, "-m", "udamon", "dirty-rate", "--pid",
                              str(d.pid), "--exact", "--precision", "0", "--duration", "60s",
                              "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        u.kill()
        u.wait()
        d.collect()
        n = len(d.windows)
        time.sleep(2.2)
        d.collect()
        assert len(d.windows) >= n + 2 and d.windows[-1]["writes"] >= 4000
        assert d.check()
        fds = [os.readlink(f"/proc/{d.pid}/fd/{f}") for f in os.listdir(f"/proc/{d.pid}/fd")]
        assert not [f for f in fds if "userfaultfd" in f], fds
    finally:
        d.stop()
