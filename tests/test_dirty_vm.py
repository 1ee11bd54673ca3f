"""Which VM to migrate: udamon against the truth inside three QEMU guests, and QEMU's own figure.

Three TCG VMs (tests/workloads/dirty_vm.py: bare-metal guests whose only writes
are a dirtier's, which prints the distinct pages it wrote per 1 s window) at
200 / 2000 / 20000 pages per second over 128 MiB.  ``udamon dirty-rate`` at its
defaults must rank them right, find each VM's guest RAM (QEMU's RAM blocks) and
estimate each rate within x1.25 of the guest's truth with 95 % intervals that
cover it (all but at most two of nine), converged within 5 s.  QEMU's
``calc-dirty-rate`` (page-sampling, its default 512 pages per GiB; the
dirty-bitmap mode segfaults QEMU 7.2 under TCG) is asked on the same VMs and
printed beside (bench/bench_dirty.py has the side-by-side numbers).  The VMs must
keep running with their data when udamon ends and when it is SIGKILLed.

These boot VMs: run them alone (``flock /tmp/udamon-guest.lock``).  They skip
only when qemu-system-x86_64 is missing.  Needs root (ptrace) and WP_ASYNC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from udamon.primitives.uffd import wp_available

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_udamon  # noqa: E402
from workloads.dirty_vm import VM, start_vms  # noqa: E402

_root = os.geteuid() == 0
_wp, _why = wp_available() if _root else (False, "not root")
pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (apt-get install "
                              "qemu-system-x86; tests/guest/ci.sh does)"),
    pytest.mark.skipif(not (_root and _wp), reason=f"needs root and wp: {_why}"),
]
PAGE = 4096
RATES = (200, 2000, 20000)


@pytest.fixture(scope="module")
def vms():
    vs = start_vms(list(RATES))
    yield vs
    for v in vs:
        v.stop()


def _truth(vm: VM, first: int) -> float:
    t = vm.truth(first)
    # the guest must have kept its pace (a starved TCG vCPU writes fewer pages per
    # real second; its count per real second still holds, but say why it moved)
    assert t["late"] <= t["windows"] // 3, f"the VM could not keep its rate: {t}"
    print(f"VM {vm.rate}: windows {[(w['ms'], w['distinct']) for w in vm.lines[first:]]}")
    return (t["distinct_mean"] + t["own_mean"]) * PAGE


def test_three_vms_ranked_within_truth_at_the_defaults(vms):
    qemu = {}
    covered: list[bool] = []
    for run in range(3):
        for v in vms:
            v.poll_console()
        first = {v.pid: len(v.lines) for v in vms}
        p = run_udamon("dirty-rate", "--pid", ",".join(str(v.pid) for v in vms),
                       "--format", "json", "-q", timeout=120)
        assert p.returncode == 0, p.stderr
        time.sleep(1.2)
        doc = json.loads(p.stdout)
        by = {v.pid: v for v in vms}
        ts = doc["targets"]
        assert [by[t["pid"]].rate for t in ts] == list(RATES), ts
        for t in ts:
            v = by[t["pid"]]
            truth = _truth(v, first[v.pid])
            ratio = t["mean_bps"] / truth
            print(f"run {run}: VM {v.rate} pages/s: udamon {t['mean_bps'] / 2**20:.3f} MiB/s "
                  f"[{t['interval']['low_bps'] / 2**20:.3f}, "
                  f"{t['interval']['high_bps'] / 2**20:.3f}], truth {truth / 2**20:.3f} MiB/s, "
                  f"ratio {ratio:.3f}, converged after {t['converged_after_ns']} ns")
            assert 1 / 1.25 <= ratio <= 1.25, (v.rate, t, truth)
            covered.append(t["interval"]["low_bps"] <= truth <= t["interval"]["high_bps"])
            if not covered[-1]:
                print(f"run {run}: VM {v.rate}: the interval misses the truth")
            assert t["converged"] and t["converged_after_ns"] <= 5_000_000_000, t
            assert t["rate_of"] == "guest-ram" and t["vmm"]["kind"] == "qemu"
            ram = sum(e - s for s, e in t["vmm"]["ram"])
            assert 800 << 20 <= ram <= 804 << 20  # pc.ram, plus the ROM blocks' 2 MiB
            parts = {x["name"]: x for x in t["parts"]}
            assert set(parts) == {"guest-ram", "vmm"}
    # Nine 95 % intervals: even calibrated ones miss one or more of nine truths in ~37 %
    # of runs (asserting all nine made this test fail about every other CI run, 2-5 %
    # off); three or more misses have a chance of 0.8 % if they are calibrated, but are
    # the rule for an interval half as wide as it should be (~68 % coverage)
    assert sum(covered) >= len(covered) - 2, covered
    for v in vms:
        qemu[v.rate] = v.calc_dirty_rate(1, 512)["dirty-rate"]
    print(f"QEMU calc-dirty-rate (page-sampling, 512 pages/GiB), MiB/s: {qemu}")
    assert qemu[20000] > max(qemu[200], qemu[2000])  # the QMP path is real: it sees the VMs
    for v in vms:
        v.poll_console()
        assert v.proc.poll() is None


def test_exact_mode_on_a_vm(vms):
    v = next(x for x in vms if x.rate == 2000)
    v.poll_console()
    first = len(v.lines)
    p = run_udamon("dirty-rate", "--pid", str(v.pid), "--exact", "--duration", "4s",
                   "--precision", "0", "--format", "json", "-q", timeout=60)
    assert p.returncode == 0, p.stderr
    time.sleep(1.2)
    (t,) = json.loads(p.stdout)["targets"]
    truth = _truth(v, first)
    assert abs(t["mean_bps"] / truth - 1) < 0.03, (t["mean_bps"], truth)


def test_vm_survives_sigkill_of_udamon():
    """A VM of its own, checking its whole buffer every other window."""
    (v,) = start_vms([20000], check=2)
    try:
        _killed_midway(v)
    finally:
        v.stop()


def _killed_midway(v: VM) -> None:
    u = subprocess.Popen([sys.executable, "-m", "udamon", "dirty-rate", "--pid", str(v.pid),
                          "--precision", "0", "--duration", "60s", "-q"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4)
    u.kill()
    u.wait()
    v.poll_console()
    n, checks = len(v.lines), len(v.checks)
    deadline = time.monotonic() + 30
    while (len(v.lines) < n + 5 or len(v.checks) <= checks) and time.monotonic() < deadline:
        time.sleep(0.5)
        v.poll_console()
    assert v.proc.poll() is None, "QEMU died"
    assert len(v.lines) >= n + 5 and v.lines[-1]["writes"] >= 19000
    assert len(v.checks) > checks and all(c["ok"] for c in v.checks)
    fds = [os.readlink(f"/proc/{v.pid}/fd/{f}") for f in os.listdir(f"/proc/{v.pid}/fd")]
    assert not [f for f in fds if "userfaultfd" in f]
