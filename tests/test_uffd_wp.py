"""Syscall injection and the wp primitive against real processes (no mocks).

Needs root (ptrace, pidfd_getfd, perf tracepoint), x86_64, gcc, and a kernel
with UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (6.7+).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from udamon.errors import RuntimeFailure
from udamon.intake.reports import REPORT_DTYPE, SOURCE_IDS
from udamon.primitives.uffd import WpPrimitive, wp_available
from udamon.primitives.uffd_abi import UFFD_FEATURE_WP_HUGETLBFS_SHMEM
from udamon.system.perf_tracepoint import FaultTracer, online_cpus
from udamon.targets import inject

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SLOW  # noqa: E402
from workloads.build import BuildError, build  # noqa: E402

_root = os.geteuid() == 0
_x86 = platform.machine() == "x86_64"
_avail, _why = wp_available() if _root and _x86 else (False, "not root or not x86_64")
needs_root = pytest.mark.skipif(not (_root and _x86), reason="needs root on x86_64 (ptrace)")
needs_wp = pytest.mark.skipif(not _avail, reason=f"wp unavailable: {_why}")
two_cpus = pytest.mark.skipif(not {0, 1} <= set(online_cpus()), reason="needs CPUs 0 and 1")
PAGE = 4096
# A target that must outlive an injection: in the TCG guest the injection helper's
# Python start alone takes 20-30 s next to a busy target (a CI run saw the target end
# first), on the host milliseconds
INJECT_SLACK_S = 40 if SLOW > 1 else 0


def _bin(name: str) -> str:
    try:
        return build(name)
    except BuildError as e:
        pytest.skip(f"cannot build {name}: {e}")


@pytest.fixture(scope="module")
def torture():
    return _bin("wp_torture")


@pytest.fixture(scope="module")
def access_pattern():
    return _bin("access_pattern")


def _spawn(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **kw)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class TickWatch:
    """Reads {"tick":N} lines of a target and checks it never stalls or blocks.

    The state sampler reads /proc only: it must never waitpid() the target, which
    is our child and may be our tracee too (a waitpid here would swallow the
    injector's ptrace-stop notifications and hang it).
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[dict] = []
        self.last_tick_t = time.monotonic()
        self.max_gap = 0.0
        self.samples: list[tuple[float, str]] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._s = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        self._s.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            d = json.loads(line)
            self.lines.append(d)
            if "tick" in d:
                now = time.monotonic()
                self.max_gap = max(self.max_gap, now - self.last_tick_t)
                self.last_tick_t = now

    def _sample(self) -> None:
        while True:
            st = _state(self.proc.pid)
            if st in ("gone", "Z", "X"):
                return
            self.samples.append((time.monotonic(), st))
            time.sleep(0.005)

    @property
    def states(self) -> set[str]:
        return {s for _, s in self.samples}

    def longest_stop(self) -> float:
        """Longest stretch of consecutive samples in a stop (t/T) state, in seconds."""
        longest, since = 0.0, None
        for t, s in self.samples:
            if s in ("t", "T"):
                since = t if since is None else since
                longest = max(longest, t - since)
            else:
                since = None
        return longest

    def stopped_after(self, t0: float) -> bool:
        return any(s in ("t", "T") for t, s in self.samples if t >= t0)

    def ticks(self) -> int:
        return sum(1 for d in self.lines if "tick" in d)

    def join(self, timeout: float = 30) -> int:
        rc = self.proc.wait(timeout)
        self._t.join(5)
        return rc


# ---------------------------------------------------------------- injection


@needs_root
def test_inject_100_cycles_registers_exact(torture):
    n = "400000000"
    clean = json.loads(subprocess.run([torture, "spin", n], capture_output=True, text=True,
                                      check=True).stdout)["result"]
    p = _spawn([torture, "spin", n])
    times = []
    try:
        time.sleep(0.02)
        for _ in range(100):
            t = time.perf_counter()
            fd = inject.inject_userfaultfd(p.pid)
            times.append(time.perf_counter() - t)
            os.close(fd)
            assert sorted(os.listdir(f"/proc/{p.pid}/fd")) == ["0", "1", "2"]
            if p.poll() is not None:
                break
        out = p.communicate(timeout=60)[0]
    finally:
        p.kill()
        p.wait()
    assert len(times) >= 50, "the target finished too early to exercise the injector"
    assert p.returncode == 0
    assert json.loads(out)["result"] == clean  # every register came back exactly
    print(f"inject+steal cycle: median {np.median(times) * 1e3:.2f} ms")


@needs_root
def test_inject_python_target_keeps_counting():
    code = textwrap.dedent("""
        import sys, time, zlib
        n = 0; crc = 0; t = time.monotonic()
        while time.monotonic() - t < 1.5:
            n += 1; crc = zlib.crc32(n.to_bytes(8, "little"), crc)
            if n % 1000 == 0: time.sleep(0.0005)
        c2 = 0
        for i in range(1, n + 1): c2 = zlib.crc32(i.to_bytes(8, "little"), c2)
        print(n, crc == c2, flush=True)
    """)
    p = _spawn([sys.executable, "-c", code])
    try:
        time.sleep(0.1)
        for _ in range(100):
            if p.poll() is not None:
                break
            os.close(inject.inject_userfaultfd(p.pid))
        out = p.communicate(timeout=30)[0].split()
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0 and out[1] == "True" and int(out[0]) > 1000


@needs_root
def test_inject_restarts_nanosleep(torture):
    p = _spawn([torture, "sleep", "800"])
    try:
        p.stdout.readline()
        time.sleep(0.1)
        for _ in range(20):
            os.close(inject.inject_userfaultfd(p.pid))
            time.sleep(0.005)
        res = json.loads(p.communicate(timeout=10)[0])
    finally:
        p.kill()
        p.wait()
    assert res["rc"] == 0 and res["errno"] == 0  # restarted, not EINTR
    assert 790 <= res["ms"] < 1500


@needs_root
def test_inject_restarts_read(torture):
    p = subprocess.Popen([torture, "read"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        p.stdout.readline()
        time.sleep(0.1)
        for _ in range(20):
            os.close(inject.inject_userfaultfd(p.pid))
        # back in read(): asleep again (it may take a moment to re-enter the syscall)
        deadline = time.time() + 5
        while _state(p.pid) != "S" and time.time() < deadline:
            time.sleep(0.01)
        assert _state(p.pid) == "S"
        p.stdin.write("hello")
        p.stdin.flush()
        res = json.loads(p.communicate(timeout=10)[0])
    finally:
        p.kill()
        p.wait()
    assert res == {"n": 5, "errno": 0, "data": "hello"}


@needs_root
def test_inject_refuses_seccomp_target(torture):
    p = _spawn([torture, "seccomp", "1"])
    try:
        p.stdout.readline()
        with pytest.raises(RuntimeFailure, match="seccomp"):
            inject.inject_userfaultfd(p.pid)
        with pytest.raises(RuntimeFailure, match="seccomp"):
            WpPrimitive([p.pid]).start([p.pid])
        out = p.communicate(timeout=10)[0]
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0 and '"end"' in out


@needs_root
def test_inject_gone_target():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(RuntimeFailure):  # TargetGone is a RuntimeFailure
        inject.inject_userfaultfd(p.pid)


@needs_root
def test_inject_multithreaded_target(access_pattern):
    p = _spawn([access_pattern, "--duration", "1.5"])
    try:
        info = json.loads(p.stdout.readline())
        for _ in range(30):
            os.close(inject.inject_userfaultfd(info["pid"]))
        end = json.loads(p.stdout.readline())
        p.wait(10)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0 and end["intact"]


# ---------------------------------------------------------------- correctness


def _drive(w: WpPrimitive, pid: int, bufs: dict, seconds: float, *, chunk=256 << 10,
           interval=0.005, seed=1):
    rng = np.random.default_rng(seed)
    armed = dict.fromkeys(bufs, 0)
    reps = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        addrs = []
        for k, (lo, hi) in bufs.items():
            starts = np.arange(lo, hi, chunk, dtype=np.uint64)
            addrs.append(starts + rng.integers(0, chunk, starts.size).astype(np.uint64))
            armed[k] += starts.size
        w.arm(pid, np.concatenate(addrs))
        time.sleep(interval)
        reps.append(w.poll(time.monotonic_ns()))
    return armed, np.concatenate(reps)


@needs_wp
@two_cpus
def test_wp_detects_writer_and_attributes(access_pattern):
    p = _spawn([access_pattern, "--duration", "4", "--reader-cpu", "0", "--writer-cpu", "1"])
    w = None
    try:
        info = json.loads(p.stdout.readline())
        pid = info["pid"]
        w = WpPrimitive([pid])
        w.start([pid])
        bufs = {k: info[k] for k in "RWI"}
        armed, r = _drive(w, pid, bufs, 2.0)
        w.stop()
        end = json.loads(p.stdout.readline())
        p.wait(10)
    finally:
        if w is not None:
            w.stop()
        p.kill()
        p.wait()
    assert r.dtype == REPORT_DTYPE
    assert (r["source"] == SOURCE_IDS["wp"]).all() and r["write"].all()
    assert (r["pid"] == pid).all()
    hits = {k: int(((r["addr"] >= lo) & (r["addr"] < hi)).sum()) for k, (lo, hi) in bufs.items()}
    assert hits["R"] == 0 and hits["I"] == 0, hits
    assert hits["W"] >= 0.3 * armed["W"], (hits, armed)
    wr = r[(r["addr"] >= bufs["W"][0]) & (r["addr"] < bufs["W"][1])]
    good = (wr["tid"] == info["writer_tid"]) & (wr["cpu"] == 1)
    frac = good.mean()
    print(f"W armed {armed['W']} written {hits['W']} attributed {frac:.4f}")
    assert frac >= 0.95
    assert (wr["node"][good] >= 0).all()
    assert end["intact"] and p.returncode == 0


_SHARED_TARGET = textwrap.dedent("""
    import ctypes, hashlib, json, mmap, os, sys, time
    n = 4 << 20
    fd = os.memfd_create("udamon-test")
    os.ftruncate(fd, n)
    bufs = {"memfd": mmap.mmap(fd, n, mmap.MAP_SHARED),  # shows as /memfd:... (deleted)
            "anon_shared": mmap.mmap(-1, n, mmap.MAP_SHARED)}  # /dev/zero (deleted)
    for b in bufs.values():
        b[:] = bytes(range(256)) * (n // 256)
    spans = {k: [ctypes.addressof(ctypes.c_char.from_buffer(b)),
                 ctypes.addressof(ctypes.c_char.from_buffer(b)) + n] for k, b in bufs.items()}
    print(json.dumps({"pid": os.getpid(), **spans}), flush=True)
    end = time.monotonic() + float(sys.argv[1])
    i = 0
    while time.monotonic() < end:  # writes the first half of each buffer only
        off = (i * 4096) % (n // 2)
        for b in bufs.values():
            b[off + 8] = b[off + 8]
        i += 1
        if i % 4096 == 0:
            time.sleep(0.001)
    print(json.dumps({k: hashlib.sha256(b).hexdigest() for k, b in bufs.items()}), flush=True)
""")


@needs_wp
def test_wp_shared_memory_written_half_hot_idle_half_cold():
    """shmem (memfd, anonymous MAP_SHARED) is registered and sampled like private memory."""
    check_shared_memory(WpPrimitive)


def check_shared_memory(cls) -> None:
    import hashlib

    want = hashlib.sha256(bytes(range(256)) * ((4 << 20) // 256)).hexdigest()
    p = _spawn([sys.executable, "-c", _SHARED_TARGET, str(4 * SLOW)])
    w = None
    try:
        info = json.loads(p.stdout.readline())
        pid = info["pid"]
        w = cls([pid], attribute=False)
        w.start([pid])
        if cls is WpPrimitive and not w._targets[pid].features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
            pytest.skip("this kernel's userfaultfd cannot write-protect shmem")
        bufs = {}
        for k in ("memfd", "anon_shared"):
            lo, hi = info[k]
            mid = (lo + hi) // 2
            bufs[k + ":written"], bufs[k + ":idle"] = (lo, mid), (mid, hi)
        armed, r = _drive(w, pid, bufs, 1.5, chunk=64 << 10, interval=0.02)
        w.stop()
        sums = json.loads(p.stdout.readline())
        p.wait(10)
    finally:
        if w is not None:
            w.stop()
        p.kill()
        p.wait()
    hits = {k: int(((r["addr"] >= lo) & (r["addr"] < hi)).sum()) for k, (lo, hi) in bufs.items()}
    print(armed, hits)
    for k in ("memfd", "anon_shared"):
        assert hits[k + ":idle"] == 0, hits
        assert hits[k + ":written"] >= 0.5 * armed[k + ":written"], (hits, armed)
        assert sums[k] == want  # the data are intact
    assert p.returncode == 0


@needs_wp
def test_wp_kernel_writes_reported_without_cpu(torture):
    """A write by another process (/proc/pid/mem) is a write without a fault of the target."""
    p = subprocess.Popen([torture, "read"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    w = WpPrimitive([p.pid])
    try:
        p.stdout.readline()
        w.start([p.pid])
        vmas = [v for v in _anon_rw(p.pid)]
        lo, hi = vmas[0]
        page = lo
        w.arm(p.pid, np.asarray([page], dtype=np.uint64))
        assert w.poll(time.monotonic_ns()).size == 0
        w.arm(p.pid, np.asarray([page], dtype=np.uint64))
        with open(f"/proc/{p.pid}/mem", "r+b", buffering=0) as f:
            f.seek(page)
            old = f.read(1)
            f.seek(page)
            f.write(old)
        r = w.poll(time.monotonic_ns())
        assert r.size == 1 and int(r["addr"][0]) == page
        assert r["cpu"][0] == -1 and r["tid"][0] == -1 and r["write"][0]
    finally:
        w.stop()
        p.kill()
        p.wait()


_SPARSE_TARGET = r"""
import mmap, sys
m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # NORESERVE
import ctypes
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
for off in map(int, sys.argv[1:]):
    m[off] = 1
print(base, flush=True)
sys.stdin.readline()
"""


@needs_wp
def test_wp_armed_pages_far_apart_each_seen_exactly():
    """Armed pages are checked cluster by cluster (neighbours within 2 MiB share one
    PAGEMAP_SCAN, the rest get their own), so spreading them over 1 GiB neither walks
    the whole span nor misses or invents a write."""
    check_far_apart(WpPrimitive)


def check_far_apart(cls) -> None:
    offs = [0, 1 << 20, 300 << 20, 700 << 20, (1 << 30) - 4096]
    p = subprocess.Popen([sys.executable, "-c", _SPARSE_TARGET, *map(str, offs)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    w = cls([p.pid], attribute=False)
    try:
        base = int(p.stdout.readline())
        w.start([p.pid])
        pages = np.asarray([base + o for o in offs], dtype=np.uint64)
        w.arm(p.pid, pages)
        assert w.poll(time.monotonic_ns()).size == 0
        w.arm(p.pid, pages)
        written = [base + offs[1], base + offs[4]]
        with open(f"/proc/{p.pid}/mem", "r+b", buffering=0) as f:
            for a in written:
                f.seek(a)
                f.write(b"\x02")
        r = w.poll(time.monotonic_ns())
        assert sorted(int(x) for x in r["addr"]) == written
    finally:
        w.stop()
        p.kill()
        p.wait()


@needs_wp
def test_wp_registration_protects_resident_pages_not_holes():
    check_resident_protected(WpPrimitive)


def _vm_pte_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmPTE:"))


def check_resident_protected(cls) -> None:
    """Registering a mapping protects its resident pages once (so that sampling a page
    the target leaves alone needs no TLB flush), leaves its holes alone (no marker, no
    page table under a sparse heap), and arming still means "protected now": a page
    written after the registration is protected again when armed, and only a write
    after that is seen.  ``protect_resident=False`` is the control."""
    from udamon.primitives.page_scan import SpanScanner, pages_in

    n = 64
    offs = [i * PAGE for i in range(n)]
    # 4 KiB pages: with THP "always" (the guest) the 64 pages would be one huge page,
    # which one access makes accessed as a whole
    target = _SPARSE_TARGET.replace("import ctypes\n",
                                    "import ctypes\nm.madvise(mmap.MADV_NOHUGEPAGE)\n")
    assert target != _SPARSE_TARGET
    p = subprocess.Popen([sys.executable, "-c", target, *map(str, offs)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hit = cls.mode.hit
    ws = []
    fd = -1
    try:
        base = int(p.stdout.readline())
        fd = os.open(f"/proc/{p.pid}/pagemap", os.O_RDONLY)
        lo = np.asarray([base], np.uint64)
        hi = np.asarray([base + n * PAGE], np.uint64)

        def unprotected() -> int:
            runs, _ = SpanScanner().scan(fd, lo, hi, cat=hit, ret=hit)
            return pages_in(runs[:, 0], runs[:, 1])

        def poke(addr: int) -> None:
            with open(f"/proc/{p.pid}/mem", "r+b", buffering=0) as f:
                f.seek(addr)
                f.write(b"\x03")

        pte0 = _vm_pte_kib(p.pid)
        ws.append(cls([p.pid], attribute=False))
        w = ws[-1]
        w.start([p.pid])
        assert w.resident_protected >= n or cls.mode.name != "wp"
        assert unprotected() == 0
        # a marker under every hole of the 1 GiB mapping would be 2 MiB of page tables
        assert _vm_pte_kib(p.pid) - pte0 < 512
        a, b = base + 3 * PAGE, base + 40 * PAGE
        poke(a)
        assert unprotected() == 1
        w.arm(p.pid, np.asarray([a, b], np.uint64))
        assert w.poll(time.monotonic_ns()).size == 0
        w.arm(p.pid, np.asarray([a, b], np.uint64))
        poke(b)
        assert [int(x) for x in w.poll(time.monotonic_ns())["addr"]] == [b]
        w.stop()
        ws.append(cls([p.pid], attribute=False, protect_resident=False))
        ws[-1].start([p.pid])
        assert unprotected() == n
    finally:
        if fd >= 0:
            os.close(fd)
        for w in ws:
            w.stop()
        p.kill()
        p.wait()


def _anon_rw(pid: int) -> list[tuple[int, int]]:
    from udamon.targets.procmaps import read_vmas

    return [(v.start, v.end) for v in read_vmas(pid)
            if v.anonymous and v.private and "w" in v.perms and not v.path.startswith("[v")]


# ---------------------------------------------------------------- safety

_WRITER = textwrap.dedent("""
    import ctypes, mmap, sys
    n = 512
    m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per page, not per huge page
    for i in range(n): m[i * 4096] = 1
    print(ctypes.addressof(ctypes.c_char.from_buffer(m)), n, flush=True)
    for line in sys.stdin:
        for i in range(n): m[i * 4096 + 1] = (m[i * 4096 + 1] + 1) % 256
        print("done", flush=True)
""")


@needs_wp
def test_stop_drops_protection_without_faults():
    check_stop_drops_protection(WpPrimitive)


def armed_fault(cls, error_code: np.ndarray) -> np.ndarray:
    """Faults an armed page makes: a write to a write-protected present page (wp), any
    user access to a PROT_NONE page, which the MMU sees as not present (rwp)."""
    if cls is WpPrimitive:
        return (error_code & 7) == 7
    return (error_code & 5) == 4


def check_stop_drops_protection(cls) -> None:
    p = subprocess.Popen([sys.executable, "-c", _WRITER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        addr, n = (int(x) for x in p.stdout.readline().split())
        pages = np.arange(n, dtype=np.uint64) * np.uint64(PAGE) + np.uint64(addr)
        lo, hi = addr, addr + n * PAGE

        def wp_faults(stop_first: bool) -> int:
            w = cls([p.pid], attribute=False)
            w.start([p.pid])
            w.arm(p.pid, pages)
            if stop_first:
                w.stop()
            with FaultTracer([p.pid]) as tr:
                p.stdin.write("go\n")
                p.stdin.flush()
                assert p.stdout.readline().strip() == "done"
                f = tr.read()
            w.stop()
            sel = (f["addr"] >= lo) & (f["addr"] < hi) & armed_fault(cls, f["error_code"])
            return int(sel.sum())

        assert wp_faults(False) >= n * 0.9  # armed: every page faults once
        assert wp_faults(True) == 0  # closed uffd: nothing left protected
        p.stdin.close()
        p.wait(10)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0


# The monitor child imports first and then reads the target's pid from stdin: its
# start-up (~30 s in a TCG guest) must not eat the target's lifetime of a few seconds
_MONITOR_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from udamon.primitives import uffd
    from udamon.targets.procmaps import read_vmas
    pid = int(sys.stdin.readline())
    w = getattr(uffd, sys.argv[1])([pid]); w.start([pid])
    vmas = [v for v in read_vmas(pid) if v.anonymous and v.private and "w" in v.perms]
    pages = np.concatenate([np.arange(v.start, v.end, 4096, dtype=np.uint64) for v in vmas])
    w.arm(pid, pages)
    print("armed", pages.size, flush=True)
    time.sleep(60)
""")


def _monitor_child(cls, **env: str) -> subprocess.Popen:
    """A process that will monitor the pid written to its stdin with ``cls``, arm every
    page of its private writable mappings, say "armed N" and sleep."""
    return subprocess.Popen([sys.executable, "-c", _MONITOR_CHILD, cls.__name__],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, **env))


def _assert_ended_intact(rc: int, watch: TickWatch) -> None:
    """The target exited 0, and its end line says the data survived (a last tick may
    print after it)."""
    assert rc == 0, watch.lines[-3:]
    ends = [d for d in watch.lines if "intact" in d]
    assert ends and ends[-1]["intact"] is True


@needs_wp
def test_sigkill_of_monitor_leaves_target_running(torture):
    check_sigkill_of_monitor(torture, WpPrimitive)


def check_sigkill_of_monitor(torture, cls) -> None:
    mon = _monitor_child(cls)
    p = _spawn([torture, "churn", str(3 * SLOW + INJECT_SLACK_S)])
    watch = None
    try:
        start = json.loads(p.stdout.readline())
        watch = TickWatch(p)
        mon.stdin.write(f"{start['pid']}\n")
        mon.stdin.flush()
        line = mon.stdout.readline()
        assert line.startswith("armed"), line
        time.sleep(0.3)
        mon.kill()
        mon.wait()
        killed_at = time.monotonic()
        ticks = watch.ticks()
        time.sleep(0.5 * SLOW)
        assert watch.ticks() > ticks  # still making progress
        rc = watch.join(30 * SLOW)
    finally:
        if mon is not None:
            mon.kill()
            mon.wait()
        p.kill()
        p.wait()
    _assert_ended_intact(rc, watch)
    assert watch.max_gap < 1.0 * SLOW
    # An injection holds the target in a ptrace stop for well under a millisecond
    # (the sampler may catch it); after the monitor died it must never be stopped.
    assert watch.longest_stop() < 0.1 * SLOW, watch.longest_stop()
    assert not watch.stopped_after(killed_at + 0.05 * SLOW)


def _tracer_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(x for x in f if x.startswith("TracerPid:")).split()[1])
    except (OSError, StopIteration):
        return 0


@needs_wp
def test_sigkill_of_monitor_during_injection_leaves_target_running(torture):
    """The injection runs in a helper process: when udamon is SIGKILLed while the
    target's registers point at the injected syscall (held there on purpose with
    UDAMON_TEST_INJECT_PAUSE_S), the helper still restores them."""
    check_sigkill_during_injection(torture, WpPrimitive)


def check_sigkill_during_injection(torture, cls) -> None:
    mon = _monitor_child(cls, UDAMON_TEST_INJECT_PAUSE_S=str(1.0 * SLOW))
    p = _spawn([torture, "churn", str(4 * SLOW + INJECT_SLACK_S)])
    try:
        start = json.loads(p.stdout.readline())
        pid = start["pid"]
        watch = TickWatch(p)
        mon.stdin.write(f"{pid}\n")
        mon.stdin.flush()
        deadline = time.monotonic() + 10 * SLOW
        while _tracer_of(pid) == 0:  # the helper has seized the target
            assert time.monotonic() < deadline and mon.poll() is None
            time.sleep(0.005)
        helper = _tracer_of(pid)
        assert helper != mon.pid
        time.sleep(0.2 * SLOW)  # inside the paused injection now
        assert _state(pid) == "t"
        mon.kill()
        mon.wait()
        # the helper finishes the injection (two paused syscalls), restores the
        # registers, lets go and exits
        deadline = time.monotonic() + 10 * SLOW
        while os.path.exists(f"/proc/{helper}") and _state(helper) not in ("Z", "gone"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        released_at = time.monotonic()
        assert _tracer_of(pid) == 0
        ticks = watch.ticks()
        deadline = time.monotonic() + 10 * SLOW  # a loaded TCG guest takes its time
        while watch.ticks() == ticks and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        # running again, or it ran to its end meanwhile (its churn lasts 4 s x SLOW,
        # which a loaded TCG guest spends in the paused injection): then it exited 0
        assert watch.ticks() > ticks or p.poll() == 0, (watch.ticks(), p.poll())
        rc = watch.join(30 * SLOW)
    finally:
        if mon is not None:
            mon.kill()
            mon.wait()
        p.kill()
        p.wait()
    _assert_ended_intact(rc, watch)
    assert not watch.stopped_after(released_at + 0.05 * SLOW)


@needs_wp
@pytest.mark.parametrize("exec_", [False, True], ids=["churn", "churn-exec"])
def test_churning_target_survives_monitoring(torture, exec_):
    check_churning_target(torture, exec_, WpPrimitive)


def check_churning_target(torture, exec_: bool, cls) -> None:
    args = [torture, "churn", str(3 * SLOW)] + (["--exec"] if exec_ else [])
    p = _spawn(args)
    w = None
    try:
        start = json.loads(p.stdout.readline())
        pid = start["pid"]
        watch = TickWatch(p)
        w = cls([pid])
        w.start([pid])
        rng = np.random.default_rng(2)
        reported = 0
        seen: list[int] = []
        while p.poll() is None:
            try:
                spans = _anon_rw(pid)
            except RuntimeFailure:
                spans = []
            if spans:
                addrs = np.concatenate([
                    np.uint64(lo) + rng.integers(0, hi - lo, 8).astype(np.uint64)
                    for lo, hi in spans])
                w.arm(pid, addrs)
            time.sleep(0.005)
            reported += w.poll(time.monotonic_ns()).size
            seen += w.exited()
        # the target has exited: the primitive says so (once) and keeps working
        time.sleep(0.05)
        assert seen + w.exited() == [pid]
        assert w.exited() == []
        w.arm(pid, np.asarray([start["main"][0]], dtype=np.uint64))
        assert w.poll(time.monotonic_ns()).size == 0
        w.stop()
        w.stop()  # idempotent
        rc = watch.join(30 * SLOW)
    finally:
        if w is not None:
            w.stop()
        p.kill()
        p.wait()
    _assert_ended_intact(rc, watch)
    assert reported > 0
    assert watch.max_gap < 1.0 * SLOW
    assert watch.longest_stop() < 0.1 * SLOW, watch.longest_stop()
    if exec_:
        assert any(d.get("event") == "exec" for d in watch.lines)
        assert any("exec" in n for n in w.stats().notes)
