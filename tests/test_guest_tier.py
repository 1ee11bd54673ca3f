"""The guest tier from the host: tests that need two NUMA nodes or Linux 7.3, run in QEMU.

Boots the two-node Linux 7.3 guest of tests/guest/ (see docs/guest.md) and
runs its default tests inside it (tests/guest/run.py DEFAULT_TESTS: NUMA
hit/miss and migration, the kernel DAMON paddr/vaddr driver, the rwp
primitive and the controlled sampling loop), then boots it again with two
sockets (two LLC domains) for thread placement (LLC_TESTS); passes when the
guest's pytest ran them all (none skipped but the pmu case: a TCG guest has no
PMU) and they passed.  Takes several minutes.  CI runs it (.ci/run runs
tests/guest/ci.sh first).  Skips with the
reason when qemu-system-x86_64 is not installed (``bash tests/guest/ci.sh``
or ``python3 tests/guest/run.py --install`` installs it), when the guest image
cannot be prepared, inside the guest itself, and when UDAMON_GUEST_TIER=0.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parent / "guest"
sys.path.insert(0, str(GUEST))
from prepare import default_cache, prepare  # noqa: E402
from run import DEFAULT_TESTS, LLC_SMP, LLC_TESTS, default_python, run_guest  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("UDAMON_GUEST") == "1", reason="already in the guest"),
    pytest.mark.skipif(os.environ.get("UDAMON_GUEST_TIER") == "0",
                       reason="guest tier turned off (UDAMON_GUEST_TIER=0)"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason=(
        "qemu-system-x86_64 not installed (bash tests/guest/ci.sh installs it and prepares "
        "the guest)")),
]


@pytest.fixture(scope="module")
def guest_cache():
    cache = default_cache()
    try:
        return prepare(cache)
    except (SystemExit, subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot prepare the guest image in {cache}: {e}")


def test_two_node_numa_in_the_guest(tmp_path, guest_cache):
    # CI's 45 minutes: the tier's ~26 min leave no room for the rwp acceptance run's THP
    # twin (~90 s); `python3 tests/guest/run.py` runs it
    _run_and_check(tmp_path, guest_cache, DEFAULT_TESTS + [
        "--deselect",
        "tests/test_uffd_rwp.py::test_rwp_record_classifies_buffers_and_attributes_cpus[thp]"],
        5)


def test_two_llc_domains_in_the_guest(tmp_path, guest_cache):
    """A second boot with two sockets (each its own L3): thread placement."""
    _run_and_check(tmp_path, guest_cache, LLC_TESTS, 1, smp=LLC_SMP, timeout=1200)


def _run_and_check(tmp_path, guest_cache, tests: list[str], min_tests: int,
                   timeout: float = 1700, **kw) -> None:
    results = tmp_path / "results"
    s = run_guest(tests, cache=guest_cache, results=results,
                  python=default_python(), timeout=timeout, **kw)
    log = (results / "guest.log").read_text(errors="replace") if (
        results / "guest.log").is_file() else ""
    print(log)
    print({k: v for k, v in s.items() if k != "qemu_output"})
    assert s["guest_status"] is not None, (
        f"{s['why']}\n{s['qemu_output']}\n"
        + (results / "console.log").read_text(errors="replace")[-3000:])
    junit = results / "junit.xml"
    assert junit.is_file(), log
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped = [
        (case.get("name"), skip.get("message", ""))
        for case in suite.iter("testcase") for skip in case.iter("skipped")]
    # A TCG guest has no PMU: the contract test's pmu case is the one skip allowed.
    unexpected = [s for s in skipped if not s[0].endswith("[pmu]")]
    assert n["tests"] >= min_tests and not unexpected, (
        f"guest tests did not all run: {n}, skipped {unexpected}\n{log}")
    assert s["guest_status"] == 0 and n["failures"] == 0 and n["errors"] == 0, log
