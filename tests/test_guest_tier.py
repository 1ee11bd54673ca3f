"""The guest tier from the host: tests that need two NUMA nodes or Linux 7.3, run in QEMU.

Boots the two-node Linux 7.3 guest of tests/guest/ (see docs/guest.md) and
runs its default tests inside it (tests/guest/run.py DEFAULT_TESTS: NUMA
hit/miss and migration, the kernel DAMON paddr/vaddr driver, the rwp
primitive and the controlled sampling loop), and thread placement in a second,
two-socket boot (LLC_TESTS).  The boots run in two lanes side by side
(run.py LANES: a single-threaded TCG guest keeps one host CPU busy).  Passes
when every guest's pytest ran its tests (none skipped but the pmu case: a TCG guest has no
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parent / "guest"
sys.path.insert(0, str(GUEST))
from prepare import default_cache, prepare  # noqa: E402
from run import LANES, default_python, precompile, run_guest  # noqa: E402

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


def test_guest_tier(tmp_path, guest_cache):
    """Every boot of tests/guest/run.py LANES, the lanes side by side (two TCG guests on
    a two-CPU host take the time of one): the default tests in a one-socket, two-node
    guest and thread placement in a two-socket one."""
    if (os.cpu_count() or 1) < 2:
        lanes = [[boot for lane in LANES for boot in lane]]  # one after the other
    else:
        lanes = LANES
    precompile(default_python())
    errors: list[str] = []

    def run_lane(i: int, lane) -> None:
        for j, (smp, tests) in enumerate(lane):
            name = f"lane{i}.{j}"
            try:
                _run_and_check(tmp_path / name, guest_cache, tests, 1, smp=smp,
                               prefix=f"{name}| ")
            except AssertionError as e:  # the other lane goes on; both are reported
                errors.append(f"{name} ({' '.join(tests)}): {e}")
            except Exception as e:  # noqa: BLE001 -- a thread's error must reach the test
                errors.append(f"{name} ({' '.join(tests)}): {type(e).__name__}: {e}")

    with ThreadPoolExecutor(len(lanes)) as ex:
        list(ex.map(run_lane, range(len(lanes)), lanes))
    assert not errors, "\n\n".join(errors)


def _run_and_check(results: Path, guest_cache, tests: list[str], min_tests: int,
                   timeout: float = 1500, **kw) -> None:
    s = run_guest(tests, cache=guest_cache, results=results, python=default_python(),
                  timeout=timeout, compile_first=False, **kw)
    log = (results / "guest.log").read_text(errors="replace") if (
        results / "guest.log").is_file() else ""
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
