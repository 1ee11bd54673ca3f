"""A process's threads as placement sees them: identity, CPU time, where each last ran,
its CPU affinity and the cgroup cpuset that bounds it.

A thread is identified by (tid, start time): a tid can be reused by a new thread after
the old one exits, and a mask must never be set on a thread that is not the one that
was planned for.  Affinity is read and set with ``sched_getaffinity``/
``sched_setaffinity`` on the thread id (the syscalls take a tid, not a process).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from udamon.errors import TargetGone
from udamon.targets.topology import parse_cpulist

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ThreadStat:
    tid: int
    comm: str
    state: str
    starttime: int  # clock ticks after boot (stat field 22): identity with the tid
    cpu_ticks: int  # utime + stime
    processor: int  # CPU it last ran on (field 39)


def parse_stat(tid: int, text: str) -> ThreadStat:
    """One ``/proc/PID/task/TID/stat`` line (comm may hold spaces and parentheses)."""
    lo, hi = text.index("("), text.rindex(")")
    rest = text[hi + 1:].split()
    # rest[0] is field 3 (state): field k is rest[k - 3]
    return ThreadStat(tid, text[lo + 1:hi], rest[0], int(rest[19]),
                      int(rest[11]) + int(rest[12]), int(rest[36]))


def read_stat(pid: int, tid: int) -> ThreadStat | None:
    """The thread's stat, None when it has exited (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            st = parse_stat(tid, f.read())
    except (OSError, ValueError, IndexError):
        return None
    return None if st.state in ("Z", "X") else st


def list_threads(pid: int) -> dict[int, ThreadStat]:
    """Every live thread of the process; TargetGone when the process is gone."""
    try:
        names = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None
    out = {}
    for n in names:
        if n.isdigit() and (st := read_stat(pid, int(n))) is not None:
            out[st.tid] = st
    if not out:
        raise TargetGone(f"process {pid} has exited")
    return dict(sorted(out.items()))


def get_mask(tid: int) -> frozenset[int]:
    """The thread's CPU affinity; ProcessLookupError when it is gone."""
    return frozenset(os.sched_getaffinity(tid))


def set_mask(tid: int, cpus) -> None:
    """Set the thread's affinity (the kernel intersects it with the cpuset; an empty
    intersection is EINVAL).  Raises OSError (ProcessLookupError when gone)."""
    os.sched_setaffinity(tid, set(cpus))


# -- cgroup cpusets ---------------------------------------------------------------


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """(fstype, mount point, root within the fs, super options) of cgroup mounts."""
    out = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        a, b = pre.split(), post.split()
        if len(a) >= 5 and len(b) >= 3 and b[0] in ("cgroup", "cgroup2"):
            out.append((b[0], a[4].replace("\\040", " "), a[3], b[2]))
    return out


def _cpus_file(mount: str, root: str, path: str, name: str, walk_up: bool) -> list[int] | None:
    if root != "/" and path.startswith(root):
        path = path[len(root):] or "/"
    cur = path.strip("/")
    while True:
        f = os.path.join(mount, cur, name) if cur else os.path.join(mount, name)
        try:
            with open(f) as fh:
                text = fh.read().strip()
            if text:
                return parse_cpulist(text)
        except (OSError, ValueError):
            pass
        if not walk_up or not cur:
            return None
        cur = cur.rpartition("/")[0]


def cpuset_cpus(pid: int, tid: int, mountinfo: str = "/proc/self/mountinfo") -> list[int] | None:
    """The effective CPUs of the thread's cgroup cpuset (v1 ``cpuset.effective_cpus``,
    v2 ``cpuset.cpus.effective`` of the nearest cgroup that has one); None when not
    known (no cpuset controller mounted, files unreadable)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mounts = _mounts(mountinfo)
    v1 = v2 = None
    for line in lines:
        m = re.fullmatch(r"(\d+):([^:]*):(.*)", line)
        if not m:
            continue
        if m.group(1) == "0" and m.group(2) == "":
            v2 = m.group(3)
        elif "cpuset" in m.group(2).split(","):
            v1 = m.group(3)
    if v1 is not None:
        for fstype, mnt, root, opts in mounts:
            if fstype == "cgroup" and "cpuset" in opts.split(","):
                got = (_cpus_file(mnt, root, v1, "cpuset.effective_cpus", False)
                       or _cpus_file(mnt, root, v1, "cpuset.cpus", True))
                if got:
                    return got
    if v2 is not None:
        for fstype, mnt, root, _ in mounts:
            if fstype == "cgroup2":
                got = _cpus_file(mnt, root, v2, "cpuset.cpus.effective", True)
                if got:
                    return got
    return None


# -- sampling CPU use and residency -----------------------------------------------


def read_schedstat(pid: int, tid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns waiting on a run queue) from ``schedstat``; None without it."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            run, wait, *_ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return None


class ThreadSampler:
    """Samples a process's threads: CPU time used between the first and the last
    sample (in CPUs: 1.0 = one CPU all the time), the share of the time it was
    runnable (on a CPU or waiting for one, from schedstat: 1.0 with a lower CPU use
    means it was starved) and on which CPU each was seen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.first: dict[int, tuple[float, ThreadStat]] = {}
        self.last: dict[int, tuple[float, ThreadStat]] = {}
        self.sched_first: dict[int, tuple[float, int, int]] = {}
        self.sched_last: dict[int, tuple[float, int, int]] = {}
        self.seen_on: dict[int, dict[int, int]] = {}  # tid -> cpu -> samples

    def sample(self) -> None:
        now = time.monotonic()
        try:
            threads = list_threads(self.pid)
        except TargetGone:
            return
        for tid, st in threads.items():
            prev = self.first.get(tid)
            if prev is not None and prev[1].starttime != st.starttime:
                # the tid was reused by a new thread: start over for it
                self.seen_on.pop(tid, None)
                prev = None
            if prev is None:
                self.first[tid] = (now, st)
                self.sched_first.pop(tid, None)
            self.last[tid] = (now, st)
            ss = read_schedstat(self.pid, tid)
            if ss is not None:
                self.sched_first.setdefault(tid, (now, *ss))
                self.sched_last[tid] = (now, *ss)
            d = self.seen_on.setdefault(tid, {})
            d[st.processor] = d.get(st.processor, 0) + 1

    def cpu_use(self, tid: int) -> float | None:
        """Mean CPUs used between the first and the last sample; None with one sample."""
        if tid not in self.first or tid not in self.last:
            return None
        (t0, s0), (t1, s1) = self.first[tid], self.last[tid]
        if t1 - t0 < 0.05 or s0.starttime != s1.starttime:
            return None
        return max(s1.cpu_ticks - s0.cpu_ticks, 0) / CLK_TCK / (t1 - t0)

    def runnable(self, tid: int) -> float | None:
        """Share of the time the thread was on a CPU or waiting for one (at most 1);
        None without schedstat or with one sample."""
        a, b = self.sched_first.get(tid), self.sched_last.get(tid)
        if a is None or b is None or b[0] - a[0] < 0.05:
            return None
        return min(max((b[1] - a[1]) + (b[2] - a[2]), 0) / 1e9 / (b[0] - a[0]), 1.0)
