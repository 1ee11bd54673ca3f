"""Shared helpers for the benchmark suite (bench/run_all.py): workloads, statistics,
running udamon and measuring its CPU time and peak RSS."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "tests"))
from workloads.build import build as build_test_workload  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
UDAMON = [sys.executable, "-m", "udamon"]


def build(name: str) -> str:
    """Compile tests/workloads/NAME.c or bench/workloads/NAME.c (cached) and return the path."""
    if (ROOT / "tests" / "workloads" / f"{name}.c").is_file():
        return build_test_workload(name)
    src = BENCH / "workloads" / f"{name}.c"
    flags = ["-O2", "-pthread", "-Wall", "-Wextra"]
    digest = hashlib.sha256(src.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"udamon-bench-{digest}" / name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("no C compiler (gcc) found")
        subprocess.run([gcc, *flags, "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    return str(out)


def summary(xs: list[float]) -> dict:
    """median, min, max and spread ((max - min) / median, in %) of repeated measurements."""
    if not xs:
        return {"n": 0}
    med = statistics.median(xs)
    return {"n": len(xs), "median": med, "min": min(xs), "max": max(xs),
            "spread_pct": (max(xs) - min(xs)) / med * 100 if med else 0.0, "values": xs}


def fmt_num(x: float, unit: str = "") -> str:
    if x is None:
        return "–"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + (f" {unit}" if unit else "")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (seconds), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def load1() -> float:
    return os.getloadavg()[0]


def start_json_workload(argv: list[str]) -> tuple[subprocess.Popen, dict]:
    """Start a workload that prints a JSON start line; return it and the parsed line."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        p.wait()
        raise RuntimeError(f"workload {argv[0]} printed nothing (rc {p.returncode})")
    return p, json.loads(line)


def finish_json_workload(p: subprocess.Popen, timeout: float = 60) -> dict:
    """The JSON end line of a workload started by start_json_workload."""
    end = {}
    for line in p.stdout:
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if d.get("event") == "end":
            end = d
    p.wait(timeout)
    if not end:
        raise RuntimeError(f"workload exited (rc {p.returncode}) without an end line")
    return end


class Watched:
    """A udamon process whose CPU time and RSS are sampled from /proc while it runs."""

    def __init__(self, argv: list[str], settle_file: str | None = None, **kw):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(argv, **kw)
        self.settle_file = settle_file
        self.samples: list[tuple[float, float]] = []  # (t, cpu_s) after settling
        self.sizes: list[int] = []  # settle_file's size at each sample
        self.hwm_kib = 0

    def poll_until_exit(self, timeout: float, every: float = 0.2) -> int:
        deadline = time.monotonic() + timeout
        while True:
            rc = self.p.poll()
            if rc is not None:
                break
            if time.monotonic() > deadline:
                self.p.terminate()
                self.p.wait(10)
                raise RuntimeError(f"{self.p.args[:4]} did not finish in {timeout:.0f} s")
            cpu = proc_cpu_s(self.p.pid)
            hwm = proc_hwm_kib(self.p.pid)
            if hwm:
                self.hwm_kib = max(self.hwm_kib, hwm)
            size = (os.path.getsize(self.settle_file)
                    if self.settle_file and os.path.exists(self.settle_file) else 0)
            settled = self.settle_file is None or size > 0
            if cpu is not None and settled:
                self.samples.append((time.monotonic(), cpu))
                self.sizes.append(size)
            time.sleep(every)
        self.wall_s = time.monotonic() - self.t0
        return rc

    def steady_cpu_pct(self) -> float | None:
        """CPU use between the first sample after start-up (header written) and the
        last one before the teardown, in % of one CPU.  With a record file the
        teardown starts after the last snapshot line (then the primitive stops and
        the end line follows), so the window ends at the first sample that saw the
        file at its last size before the end line: closing wp's userfaultfd over
        8 GiB, for one, takes ~0.2 s once, which is not a per-second cost."""
        samples = self.samples
        if self.settle_file and self.sizes:
            distinct = sorted(set(self.sizes))
            if len(distinct) >= 3:
                before_end = distinct[-2]
                samples = samples[:self.sizes.index(before_end) + 1]
        if len(samples) < 3:
            return None
        (t0, c0), (t1, c1) = samples[0], samples[-1]
        return (c1 - c0) / (t1 - t0) * 100 if t1 > t0 else None


def read_record(path: str) -> tuple[dict, list[dict], dict]:
    """(header, snapshots, end) of a udamon record file."""
    head, snaps, end = {}, [], {}
    with open(path) as f:
        for i, line in enumerate(f):
            d = json.loads(line)
            if i == 0:
                head = d
            elif "end" in d:
                end = d["end"]
            else:
                snaps.append(d)
    return head, snaps, end


def ensure_debian_package(pkg: str, binary: str) -> tuple[bool, str]:
    """Install a Debian package with apt-get when its binary is missing (root only)."""
    if shutil.which(binary):
        return True, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False, f"{binary} not installed and cannot apt-get install {pkg} (not root/no apt)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], capture_output=True,
                           text=True, env=env)
    if r.returncode != 0 or not shutil.which(binary):
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"apt-get install {pkg} failed: {last}"
    return True, f"installed {pkg} with apt-get"
