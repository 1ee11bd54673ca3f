import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_udamon(*args: str, check: bool = False, timeout: float = 120, **kw):
    """Run the real CLI in a subprocess (as a user would)."""
    p = subprocess.run([sys.executable, "-m", "udamon", *args], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"udamon {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture
def udamon():
    return run_udamon


def start_workload(binary, *args):
    p = subprocess.Popen([binary, "--reader-cpu", "0", "--writer-cpu", "1", *args],
                         stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    return p, info


def buffer_hits(rec, lo, hi):
    """Probe hits (and nr_accesses) summed over all snapshots, regions wholly in [lo, hi)."""
    tot: dict[str, int] = {}
    for s in rec.snapshots:
        inside = (s.start >= lo) & (s.end <= hi)
        tot["nr_accesses"] = tot.get("nr_accesses", 0) + int(s.nr_accesses[inside].sum())
        for name, h in s.probe_hits.items():
            tot[name] = tot.get(name, 0) + int(h[inside].sum())
    return tot


# The Linux 7.3 guest (tests/guest/) runs the uffd tests under TCG, where starting
# Python and injecting take seconds: target lifetimes, turn lengths and the bounds on a
# target's stalls stretch by this factor there (the bounds stay far below a hang).
SLOW = 10 if os.environ.get("UDAMON_GUEST") == "1" else 1


def buffer_probes(info, write: bool = True) -> list[str]:
    """--probe options per buffer B of access_pattern: B (its address range), B_c0 /
    B_c1 (and CPU 0 / 1) and, with ``write``, B_w (and a write): exact per-buffer
    counts whatever the region boundaries (equally warm adjacent buffers merge into
    one DAMON region)."""
    out = []
    for b in "RWSI":
        a = f"addr:{info[b][0]:#x}-{info[b][1]:#x}"
        out += ["--probe", f"{b}={a}", "--probe", f"{b}_c0={a},cpus:0",
                "--probe", f"{b}_c1={a},cpus:1"]
        if write:
            out += ["--probe", f"{b}_w={a},write"]
    return out


def share(hits, name, *others):
    total = hits.get(name, 0) + sum(hits.get(o, 0) for o in others)
    return hits.get(name, 0) / total if total else float("nan")


@pytest.fixture(scope="session")
def access_pattern_bin():
    """The pinned C workload (tests/workloads/access_pattern.c), built once."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from workloads.build import BuildError, build

    try:
        return build("access_pattern")
    except BuildError as e:
        pytest.skip(f"cannot build the workload: {e}")


def buffers_span(info: dict) -> str:
    """'START-END' covering the workload's four buffers, for --range."""
    lo = min(v[0] for k, v in info.items() if k in "RWSI")
    hi = max(v[1] for k, v in info.items() if k in "RWSI")
    return f"{lo:#x}-{hi:#x}"


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the reliability campaign's long version (tests/test_fuzz.py: "
                          ">= 10,000 inputs per parser; tests/test_campaign.py: 200+ "
                          "attach/detach cycles per primitive); see bench/bench_campaign.py")


def pytest_configure(config):
    if config.getoption("--soak", default=False):
        os.environ["UDAMON_SOAK"] = "1"  # read by the campaign modules when collected


@pytest.fixture
def no_numa_balancing():
    """Automatic NUMA balancing off for the test, restored after: a paddr test watches
    the frames its buffers had at the start, and balancing (on by default in the
    two-node guest) moved them away (an anon buffer 0 % anonymous at its old frames,
    a hot buffer's old frames idle)."""
    path = "/proc/sys/kernel/numa_balancing"
    old = open(path).read().strip() if os.path.exists(path) else None
    if old is not None:
        with open(path, "w") as f:
            f.write("0\n")
    yield
    if old is not None:
        with open(path, "w") as f:
            f.write(old + "\n")
