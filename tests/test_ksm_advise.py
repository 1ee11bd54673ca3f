"""The KSM advisor against the real KSM of this host (no mocks).

Ground truth: tests/workloads/ksm_dup.c, four regions of 4-way duplicate pages
written never / 2000 pages/s / 5 pages/s / read only.  A second instance marks
its four regions MADV_MERGEABLE itself and the real ksmd merges it; which of its
pages are KSM pages is read from /proc/PID/pagemap -> PFN -> /proc/kpageflags
bit 21 (KPF_KSM), twice, seconds apart: the regions KSM merges *and keeps
merged* (>= 50 % of their pages both times).  The advisor, at its defaults, must
name exactly those regions (3 runs), and after --apply the saving it predicted
must be within 25 % of ksm_merging_pages x page size.

KSM is global: the tests wait while other processes offer memory to KSM (they
would be merged by the settings the tests set), set ksmd's pace through
udamon's SettingsGuard, and check that every setting is back at the end.  Needs
root (ptrace, PFNs), x86_64, gcc, a kernel with KSM and userfaultfd WP_ASYNC.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from udamon.primitives.uffd import wp_available
from udamon.targets import ksm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_udamon  # noqa: E402
from workloads.build import BuildError, build  # noqa: E402

_root = os.geteuid() == 0
_wp, _why = wp_available() if _root else (False, "not root")
_ksm, _ksm_why = ksm.available()
pytestmark = [
    pytest.mark.skipif(not _root, reason="needs root (ptrace, page frame numbers)"),
    pytest.mark.skipif(not _wp, reason=f"wp unavailable: {_why}"),
    pytest.mark.skipif(not _ksm, reason=_ksm_why),
]
PAGE = 4096
WAIT_OTHERS_S = float(os.environ.get("UDAMON_TEST_KSM_WAIT_S", "600"))
FAST = {"pages_to_scan": "4000", "sleep_millisecs": "10"}


@pytest.fixture(scope="module")
def ksm_dup():
    try:
        return build("ksm_dup")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


@pytest.fixture(scope="module")
def ksm_alone():
    """KSM's settings before the module, and KSM to ourselves: wait while other
    processes offer memory to it (the guest tier's QEMU does, with mem-merge on)."""
    t0 = time.monotonic()
    while True:
        others = ksm.mergeable_processes({os.getpid()})
        if not others:
            break
        if time.monotonic() - t0 > WAIT_OTHERS_S:
            pytest.skip(f"other processes keep memory offered to KSM ({others[:3]}): "
                        "changing KSM's settings would merge theirs")
        time.sleep(5)
    before = ksm.settings()
    yield before
    assert ksm.settings() == before, "KSM's settings were not restored"


class Workload:
    def __init__(self, binary: str, *args: str) -> None:
        self.p = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.p.stdout.readline())
        self.regions = {r["name"]: (r["start"], r["end"]) for r in self.info["regions"]}

    @property
    def pid(self) -> int:
        return self.p.pid

    def merged_share(self) -> dict[str, float]:
        """Per region, the share of its pages that are KSM pages now (kpageflags)."""
        out = {}
        for name, (lo, hi) in self.regions.items():
            present, is_ksm = ksm.page_flags(self.pid, lo, hi)
            out[name] = float(is_ksm.mean())
        return out

    def check(self) -> dict:
        os.kill(self.pid, signal.SIGUSR1)
        return json.loads(self.p.stdout.readline())

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def regions_covered(w: Workload, candidates: list[dict], share: float = 0.5) -> set[str]:
    """Regions at least ``share`` of whose pages the candidate ranges would merge."""
    out = set()
    for name, (lo, hi) in w.regions.items():
        pages = 0
        for c in candidates:
            a, b = max(lo, c["start"]), min(hi, c["end"])
            if a < b:
                # the candidate's mergeable pages, in proportion to its overlap
                pages += c["pages"] * (b - a) / (c["end"] - c["start"])
        if pages >= share * (hi - lo) / PAGE:
            out.add(name)
    return out


def _set_fast(guard) -> None:
    for k, v in FAST.items():
        guard.set(f"{ksm.KSM_DIR}/{k}", v)
    guard.set(f"{ksm.KSM_DIR}/run", "1")


def _wait_merged(w: Workload, timeout: float = 90.0) -> dict[str, float]:
    """Until KSM's full scans stop changing the workload's merged pages."""
    t0 = time.monotonic()
    last, stable_scans = None, ksm.counters()["full_scans"]
    while time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        cur = int(ksm.ksm_stat(w.pid).get("ksm_merging_pages", 0))
        scans = ksm.counters()["full_scans"]
        if last is None or abs(cur - last) > 64:
            last, stable_scans = cur, scans
        elif scans - stable_scans >= 3:
            break
    return w.merged_share()


@pytest.fixture(scope="module")
def ksm_truth(ksm_dup, ksm_alone):
    """Which regions the real KSM merges and keeps merged, with all four offered."""
    from udamon.system.sysctl_guard import SettingsGuard

    w = Workload(ksm_dup, "--mergeable", "--seed", "7")
    guard = SettingsGuard(handle_signals=False)
    try:
        _set_fast(guard)
        first = _wait_merged(w)
        time.sleep(5)
        second = w.merged_share()
        assert w.check()["ok"], "KSM merging changed the workload's data"
    finally:
        w.stop()
        guard.restore()
    kept = {n for n in first if first[n] >= 0.5 and second[n] >= 0.5}
    return {"first": first, "second": second, "kept": kept}


def test_ksm_merges_what_the_workload_says(ksm_truth):
    """The ground truth itself: never, slow and read merge and stay; hot does not."""
    assert ksm_truth["kept"] == {"never", "slow", "read"}, ksm_truth
    assert ksm_truth["second"]["hot"] < 0.2, ksm_truth


def test_advisor_candidates_are_the_regions_ksm_keeps_merged(ksm_dup, ksm_truth):
    """Three runs at the defaults, side by side (three workloads, three advisors)."""
    ws = [Workload(ksm_dup, "--seed", str(run + 1)) for run in range(3)]
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "udamon", "ksm-advise", "--pid",
                                   str(w.pid), "--format", "json", "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for w in ws]
        outs = [p.communicate(timeout=120) for p in procs]
        for run, (w, p, (out, err)) in enumerate(zip(ws, procs, outs, strict=True)):
            assert p.returncode == 0, err
            (t,) = json.loads(out)["targets"]
            print(f"run {run}: candidates cover {sorted(regions_covered(w, t['candidates']))}"
                  f", KSM keeps {sorted(ksm_truth['kept'])}")
            assert regions_covered(w, t["candidates"]) == ksm_truth["kept"], \
                (run, t["candidates"], ksm_truth)
            # ranked by predicted saving, page-level, the contract's keys
            savings = [c["predicted_saving"] for c in t["candidates"]]
            assert savings == sorted(savings, reverse=True)
            for c in t["candidates"]:
                assert {"start", "end", "never_written", "unwritten_ns",
                        "predicted_saving"} <= set(c)
                assert c["start"] % PAGE == 0 and c["end"] % PAGE == 0
            never = [c for c in t["candidates"]
                     if c["start"] <= w.regions["never"][0] < c["end"]]
            assert never and never[0]["never_written"]
            assert w.check()["ok"]
            assert ksm.ksm_stat(w.pid).get("ksm_mergeable") in (False, None), \
                "the advisor without --apply offered memory to KSM"
    finally:
        for w in ws:
            w.stop()


def test_apply_predicted_saving_matches_ksm(ksm_dup, ksm_alone):
    w = Workload(ksm_dup, "--seed", "11")
    try:
        p = run_udamon("ksm-advise", "--pid", str(w.pid), "--apply", "--ksm-run",
                       "--ksm-pages-to-scan", FAST["pages_to_scan"], "--ksm-sleep",
                       FAST["sleep_millisecs"] + "ms", "--wait", "60s", "--format", "json",
                       "-q", timeout=180)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert ksm.settings() == ksm_alone, "--ksm-run did not restore KSM's settings"
        (ap,) = doc["apply"]["targets"]
        assert all(c["result"] == 0 for c in ap["calls"]), ap["calls"]
        pred, act = ap["predicted_saving"], ap["actual_saving"]
        print(f"predicted saving {pred / 2**20:.1f} MiB, actual (ksm_stat) {act / 2**20:.1f} MiB"
              f", ratio {act / max(pred, 1):.3f}")
        assert pred > 0 and abs(act - pred) <= 0.25 * pred, (pred, act)
        # only the candidates were offered: the hot region stays unmerged
        share = w.merged_share()
        assert share["hot"] < 0.2 and min(share["never"], share["read"]) > 0.9, share
        assert w.check()["ok"]
    finally:
        w.stop()


def test_apply_takes_write_hot_ranges_back(ksm_dup, ksm_alone):
    """A workload that offers all four regions itself: --apply marks the hot one
    MADV_UNMERGEABLE (KSM's settings untouched: no --ksm-run)."""
    w = Workload(ksm_dup, "--mergeable", "--seed", "5")
    try:
        p = run_udamon("ksm-advise", "--pid", str(w.pid), "--apply", "--wait", "1s",
                       "--format", "json", "-q", timeout=120)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        (t,) = doc["targets"]
        hot = w.regions["hot"]
        assert any(r["start"] < hot[1] and r["end"] > hot[0] for r in t["unmerge"]), t["unmerge"]
        with open(f"/proc/{w.pid}/smaps") as f:
            from udamon.targets.vmm import parse_smaps

            maps = parse_smaps(f.read())
        def offered(lo, hi):
            """Share of [lo, hi) in mappings offered to KSM."""
            return sum(min(hi, m.end) - max(lo, m.start) for m in maps
                       if m.start < hi and m.end > lo and "mg" in m.flags) / (hi - lo)

        # page-level ranges: a few unwritten pages at the hot region's edges may stay
        assert offered(*hot) < 0.01, offered(*hot)
        assert offered(*w.regions["never"]) == 1.0 and offered(*w.regions["read"]) == 1.0
        assert ksm.settings() == ksm_alone
        assert w.check()["ok"]
    finally:
        w.stop()


def test_dry_run_changes_nothing(ksm_dup, ksm_alone):
    w = Workload(ksm_dup, "--seed", "3", "--mib", "8")
    try:
        p = run_udamon("ksm-advise", "--pid", str(w.pid), "--apply", "--dry-run",
                       "--duration", "3s", "--format", "json", "-q", timeout=60)
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["apply"]["dry_run"] and doc["apply"]["targets"][0]["calls"]
        assert not ksm.ksm_stat(w.pid).get("ksm_mergeable")
        assert ksm.settings() == ksm_alone
    finally:
        w.stop()


def test_sigkill_during_ksm_run_restores_settings(ksm_dup, ksm_alone):
    """udamon killed while ksmd runs for it: the settings watchdog puts them back,
    the target keeps its data."""
    w = Workload(ksm_dup, "--seed", "9", "--mib", "8")
    try:
        u = subprocess.Popen([sys.executable, "-m", "udamon", "ksm-advise", "--pid", str(w.pid),
                              "--duration", "2s", "--apply", "--ksm-run",
                              "--ksm-pages-to-scan", "1234", "--wait", "60s", "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while ksm.settings().get("pages_to_scan") != 1234:
            assert u.poll() is None, u.stderr.read()
            assert time.monotonic() < deadline, "udamon never ran ksmd"
            time.sleep(0.1)
        u.kill()
        u.wait()
        deadline = time.monotonic() + 15
        while ksm.settings() != ksm_alone and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ksm.settings() == ksm_alone
        assert w.check()["ok"]
        assert w.p.poll() is None
    finally:
        w.stop()


def test_duplicates_across_targets(ksm_dup, ksm_alone):
    """Pages unique within each process but the same in two (same seed, --copies 1):
    alone nothing is predicted; together every cold page of the never-written and
    read-only regions is (the hot region's pages are rewritten)."""
    a = Workload(ksm_dup, "--seed", "21", "--mib", "8", "--copies", "1")
    b = Workload(ksm_dup, "--seed", "21", "--mib", "8", "--copies", "1")
    try:
        alone = run_udamon("ksm-advise", "--pid", str(a.pid), "--duration", "2s",
                           "--format", "json", "-q", timeout=60)
        assert alone.returncode == 0, alone.stderr
        (t,) = json.loads(alone.stdout)["targets"]
        assert t["predicted"]["merging_pages"] < 16 and not t["candidates"], t["predicted"]
        both = run_udamon("ksm-advise", "--pid", f"{a.pid},{b.pid}", "--duration", "4s",
                          "--format", "json", "-q", timeout=60)
        assert both.returncode == 0, both.stderr
        doc = json.loads(both.stdout)
        npages = 8 * 256
        for w, t in zip((a, b), sorted(doc["targets"], key=lambda t: t["pid"] != a.pid),
                        strict=True):
            got = regions_covered(w, t["candidates"])
            assert {"never", "read"} <= got and "hot" not in got, (got, t["candidates"])
            assert t["predicted"]["merging_pages"] >= 2 * npages
        # one copy of each content is kept: about half of what merges is freed
        merging = sum(t["predicted"]["merging_pages"] for t in doc["targets"])
        assert abs(doc["freed_bytes"] / PAGE - merging / 2) <= 0.02 * merging
    finally:
        a.stop()
        b.stop()
