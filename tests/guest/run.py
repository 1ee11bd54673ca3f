#!/usr/bin/env python3
"""Run pytest inside a two-node QEMU guest and carry its result out.

    python3 tests/guest/run.py [--install] [-- PYTEST ARGS...]

Default pytest arguments: ``tests/test_guest_numa.py``.  The guest (see
prepare.py) is Debian's Linux 7.3 kernel under TCG with two NUMA nodes (CPU 0 and
512 MiB on node 0, CPU 1 and 512 MiB on node 1), the host's root shared
read-only over 9p under a tmpfs overlay, so the repository and its venv run
inside as they are.  A second, writable 9p share (a host temporary directory,
or ``--results DIR``) carries out ``guest.log`` (pytest's output), ``junit.xml``,
``status`` (pytest's exit status: QEMU itself always exits 0), ``boot_s``
(seconds from kernel start to user space) and ``console.log``.  The guest's
output is streamed to stdout while it runs; the exit status is pytest's in the
guest, or 1 when the guest never reported one (a summary line says why).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from prepare import default_cache, prepare  # noqa: E402

DEFAULT_TESTS = ["tests/test_guest_numa.py", "tests/test_kernel_damon.py",
                 "tests/test_uffd_loop.py", "tests/test_uffd_rwp.py",
                 "tests/test_primitive_contract.py", "tests/test_kernel_guest.py"]
DEFAULT_SMP = "2"  # QEMU 7.2: one socket of two cores, one shared L3
# A second boot for the tests that need two LLC domains: two sockets of one CPU each,
# each its own L3 and (as in the default boot) its own NUMA node
LLC_SMP = "2,sockets=2"
LLC_TESTS = ["tests/test_guest_place.py"]
# tests/test_guest_tier.py boots guests two at a time: a TCG guest runs its vCPUs on
# one host thread, so a two-CPU host runs two of them side by side in the time of one.
# Each lane is a list of boots, (smp, pytest args), one after the other; the lanes split
# the default tests (plus the two-socket boot) into halves of about equal guest time.
LANES = [
    [(DEFAULT_SMP, ["tests/test_guest_numa.py", "tests/test_kernel_damon.py",
                    "tests/test_kernel_guest.py"])],
    [(DEFAULT_SMP, ["tests/test_uffd_rwp.py", "tests/test_uffd_loop.py",
                    "tests/test_primitive_contract.py"]),
     (LLC_SMP, LLC_TESTS)],
]
assert sorted(t for lane in LANES for smp, ts in lane if smp == DEFAULT_SMP
              for t in ts) == sorted(DEFAULT_TESTS)


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def guest_script(python: str, pytest_args: list[str], shell: str | None = None) -> str:
    args = " ".join(shlex.quote(a) for a in pytest_args)
    cmd = shell if shell is not None else (
        f"{shlex.quote(python)} -m pytest -p no:cacheprovider -q -rs \\\n"
        f"    --junitxml=/udamon-results/junit.xml {args}")
    return f"""#!/bin/sh
# written by tests/guest/run.py; runs chrooted in the guest's overlay root
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 UDAMON_GUEST=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
export PYTHONUNBUFFERED=1
# /tmp is the guest's own tmpfs: a repository under the host's /tmp (a CI clone)
# is bound in from the host root the init keeps at /.host (read-only)
if [ ! -d {shlex.quote(str(REPO))} ] && [ -d /.host{shlex.quote(str(REPO))} ]; then
    mkdir -p {shlex.quote(str(REPO))} && mount --bind /.host{shlex.quote(str(REPO))} \
        {shlex.quote(str(REPO))}
fi
cd {shlex.quote(str(REPO))} || exit 125
echo "guest: Linux $(uname -r), $(nproc) CPUs, nodes: $(cd /sys/devices/system/node && echo node*)"
for n in /sys/devices/system/node/node*; do
    echo "guest: $(basename $n) cpus $(cat $n/cpulist)"
done
{cmd}
"""


def qemu_command(cache: Path, results: Path, mem_per_node_mb: int,
                 smp: str = DEFAULT_SMP) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("run: qemu-system-x86_64 not found (apt-get install qemu-system-x86, "
                         "or run with --install as root)")
    m = mem_per_node_mb
    return [
        # thread=single: the two vCPUs take turns on one host thread.  Multi-threaded
        # TCG let a vCPU run a stale int3 while the other patched kernel text (a static
        # key flip: perf, numa_balancing), and the guest kernel oopsed ("int3" in
        # __schedule, about 1 run in 8).  UDAMON_GUEST_TCG_THREAD=multi goes back.
        qemu, "-accel", f"tcg,thread={os.environ.get('UDAMON_GUEST_TCG_THREAD', 'single')}",
        "-cpu", os.environ.get("UDAMON_GUEST_CPU", "Haswell-noTSX"),
        "-smp", smp, "-m", f"{2 * m}M",
        "-object", f"memory-backend-ram,id=m0,size={m}M",
        "-object", f"memory-backend-ram,id=m1,size={m}M",
        "-numa", "node,nodeid=0,cpus=0,memdev=m0",
        "-numa", "node,nodeid=1,cpus=1,memdev=m1",
        "-kernel", str(cache / "vmlinuz"), "-initrd", str(cache / "initramfs.gz"),
        # damon_stat.enabled=N: Debian's 7.3 starts DAMON_STAT at boot, an *exclusive*
        # kdamond that makes every sysfs kdamond fail with EBUSY (mm/damon/core.c
        # damon_start); the tests start their own
        "-append", "console=ttyS0 panic=-1 loglevel=4 mitigations=off damon_stat.enabled=N",
        "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{results / 'console.log'}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,"
                   "multidevs=remap",
    ]


class Tail:
    """Print what a growing file gains, line by line, with a prefix."""

    def __init__(self, path: Path, prefix: str, out=sys.stdout):
        self.path, self.prefix, self.out, self.pos, self.part = path, prefix, out, 0, b""

    def poll(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        lines = (self.part + data).split(b"\n")
        self.part = lines.pop()
        if final and self.part:
            lines.append(self.part)
            self.part = b""
        for line in lines:
            self.out.write(self.prefix + line.decode(errors="replace") + "\n")
        self.out.flush()


def precompile(python: str) -> None:
    """Compile the repository's Python files on the host, into its own __pycache__.

    The guest sees the repository read-only (and writes no bytecode): without this
    every Python process in the TCG guest compiled udamon's ~100 modules again, 45 s of
    the ~140 s a `udamon record` spent starting in there.  Best effort: a failure
    only costs time."""
    subprocess.run([python, "-m", "compileall", "-q", "-j", "0", str(REPO / "src"),
                    str(REPO / "tests"), str(REPO / "bench")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def run_guest(pytest_args: list[str], *, cache: Path, results: Path, python: str,
              timeout: float = 900, mem_per_node_mb: int = 512, stream: bool = True,
              install: bool = False, shell: str | None = None,
              smp: str = DEFAULT_SMP, prefix: str = "guest| ",
              compile_first: bool = True) -> dict:
    """Boot the guest, run pytest in it; return the summary (also in results/summary.json)."""
    t0 = time.monotonic()
    prepare(cache, install=install)
    if compile_first:
        precompile(python)
    t_prep = time.monotonic() - t0
    results.mkdir(parents=True, exist_ok=True)
    for name in ("status", "guest.log", "junit.xml", "boot_s", "console.log"):
        (results / name).unlink(missing_ok=True)
    (results / "guest.sh").write_text(guest_script(python, pytest_args, shell))
    cmd = qemu_command(cache, results, mem_per_node_mb, smp)
    (results / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    t1 = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    tail = Tail(results / "guest.log", prefix)
    timed_out = False
    try:
        while qemu.poll() is None:
            if stream:
                tail.poll()
            if time.monotonic() - t1 > timeout:
                timed_out = True
                os.killpg(qemu.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
    except BaseException:
        os.killpg(qemu.pid, signal.SIGKILL)
        qemu.wait()
        raise
    qemu.wait()
    if stream:
        tail.poll(final=True)
    qemu_out = qemu.stdout.read().decode(errors="replace") if qemu.stdout else ""
    t_guest = time.monotonic() - t1
    status_file = results / "status"
    status = None
    if status_file.is_file() and status_file.read_text().strip().lstrip("-").isdigit():
        status = int(status_file.read_text().strip())
    boot = None
    if (results / "boot_s").is_file():
        try:
            boot = float((results / "boot_s").read_text().strip())
        except ValueError:
            pass
    why = None
    if status is None:
        why = (f"the guest timed out after {timeout:.0f} s" if timed_out
               else "the guest stopped without reporting a status")
    summary = {"status": status if status is not None else 1, "guest_status": status,
               "why": why, "boot_s": boot, "guest_s": round(t_guest, 1),
               "prepare_s": round(t_prep, 1), "qemu_rc": qemu.returncode,
               "qemu_output": qemu_out[-2000:], "pytest_args": pytest_args,
               "results": str(results)}
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Run pytest inside a two-NUMA-node QEMU guest (tests/guest/).",
        epilog="Arguments after -- go to pytest in the guest (paths relative to the repo); "
               f"default: {' '.join(DEFAULT_TESTS)}")
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="guest image cache (default %(default)s)")
    ap.add_argument("--results", type=Path,
                    help="results directory (default: a new temporary directory)")
    ap.add_argument("--python", default=default_python(),
                    help="Python to run pytest with in the guest (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds (default %(default)s)")
    ap.add_argument("--mem-per-node", type=int, default=512, help="MiB (default %(default)s)")
    ap.add_argument("--smp", default=DEFAULT_SMP,
                    help=f"QEMU -smp (default %(default)s: one socket of two cores sharing one "
                         f"L3; {LLC_SMP!r}: two sockets, an L3 each, as {' '.join(LLC_TESTS)} "
                         "needs); CPU i is on node i either way")
    ap.add_argument("--install", action="store_true",
                    help="as root, apt-get install qemu-system-x86 when it is missing")
    ap.add_argument("--quiet", "-q", action="store_true", help="do not stream the guest's output")
    ap.add_argument("--shell", metavar="CMD",
                    help="run this shell command in the guest instead of pytest (debugging)")
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args()
    results = a.results or Path(tempfile.mkdtemp(prefix="udamon-guest-results-"))
    s = run_guest(a.pytest_args or DEFAULT_TESTS, cache=a.cache, results=results,
                  python=a.python, timeout=a.timeout, mem_per_node_mb=a.mem_per_node,
                  stream=not a.quiet, install=a.install, shell=a.shell, smp=a.smp)
    if s["why"]:
        print(f"run: {s['why']}; console (last lines):", file=sys.stderr)
        con = results / "console.log"
        if con.is_file():
            for line in con.read_text(errors="replace").splitlines()[-40:]:
                print(f"console| {line}", file=sys.stderr)
        if s["qemu_output"].strip():
            print(f"qemu| {s['qemu_output'].strip()}", file=sys.stderr)
    boot = f"{s['boot_s']:.1f} s" if s["boot_s"] is not None else "?"
    print(f"run: guest pytest exit status {s['guest_status']}; boot to user space {boot}, "
          f"guest {s['guest_s']:.1f} s, prepare {s['prepare_s']:.1f} s; results in {results}",
          flush=True)
    return s["status"]


if __name__ == "__main__":
    sys.exit(main())
