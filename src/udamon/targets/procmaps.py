"""Virtual memory areas of a process from /proc/<pid>/maps, and DAMON's
vaddr heuristic that turns them into three monitoring ranges."""

from __future__ import annotations

import os
from typing import NamedTuple

from udamon.errors import RuntimeFailure, TargetGone


class Vma(NamedTuple):
    """One line of /proc/PID/maps (a NamedTuple: parsing a few hundred of them once a
    second is on the monitoring loop's path)."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def anonymous(self) -> bool:
        return self.inode == 0 and not self.path.startswith("/")

    @property
    def private(self) -> bool:
        return self.perms[3:4] == "p"


def parse_maps(text: str) -> list[Vma]:
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        out.append(Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
                       int(parts[4]), parts[5].strip() if len(parts) > 5 else ""))
    return out


def read_maps_text(pid: int) -> str:
    """/proc/PID/maps as text; raises TargetGone when the process has exited.  A process
    whose main thread exited while others run (a zombie leader) has an empty
    /proc/PID/maps: its maps are read through a live thread (``mm_path``)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
        if not text and _state(f"/proc/{pid}/stat") == "Z":
            with open(mm_path(pid, "maps")) as f:
                text = f.read()
        return text
    except FileNotFoundError:
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None
    except PermissionError:
        raise RuntimeFailure(f"cannot read /proc/{pid}/maps: permission denied "
                             "(run as root or as the process's owner)") from None
    except ProcessLookupError:
        raise TargetGone(f"process {pid} has exited") from None


def read_vmas(pid: int) -> list[Vma]:
    """The process's VMAs; raises TargetGone when it has exited."""
    vmas = parse_maps(read_maps_text(pid))
    if not vmas and not is_alive(pid):
        raise TargetGone(f"process {pid} has exited")
    return vmas


def _state(stat_path: str) -> str:
    """The state letter of a /proc/.../stat file ('' when it cannot be read)."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def is_alive(pid: int) -> bool:
    """True while the process exists and has a thread that has not exited.  Its main
    thread may have exited (pthread_exit in main: a zombie leader) while others run:
    the process is alive until the last of them exits."""
    state = _state(f"/proc/{pid}/stat")
    if state not in ("Z", "X"):
        return bool(state)
    return mm_task(pid, missing_ok=True) is not None


def mm_task(pid: int, *, missing_ok: bool = False) -> int | None:
    """A task of process ``pid`` that still has the process's memory: ``pid`` itself,
    or, when the main thread has exited (zombie leader), a live thread of it.  Files
    under /proc/PID (maps, pagemap, mem) and move_pages(PID) see no memory for a zombie
    leader; the same files of a live thread (/proc/PID/task/TID/...) do.  None (or
    TargetGone) when no thread is left."""
    if _state(f"/proc/{pid}/stat") not in ("Z", "X", ""):
        return pid
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for t in sorted(tids):
        if t.isdigit() and int(t) != pid and _state(f"/proc/{pid}/task/{t}/stat") not in (
                "Z", "X", ""):
            return int(t)
    if missing_ok:
        return None
    raise TargetGone(f"process {pid} has exited")


def mm_path(pid: int, name: str) -> str:
    """/proc/PID/NAME, or /proc/PID/task/TID/NAME of a live thread when the main thread
    has exited (see ``mm_task``)."""
    tid = mm_task(pid)
    return f"/proc/{pid}/{name}" if tid == pid else f"/proc/{pid}/task/{tid}/{name}"


KTHREAD_FLAG = 0x00200000  # PF_KTHREAD in /proc/PID/stat's flags (field 9)


def kernel_thread_name(pid: int) -> str | None:
    """The name of ``pid`` when it is a kernel thread (no user memory to monitor), else
    None (also when it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        flags = int(data.rsplit(")", 1)[1].split()[6])
    except (OSError, IndexError, ValueError):
        return None
    if not flags & KTHREAD_FLAG:
        return None
    return data[data.find("(") + 1: data.rfind(")")]


def three_regions(vmas: list[Vma]) -> list[tuple[int, int]]:
    """DAMON's vaddr heuristic (__damon_va_three_regions): cover the address
    space from the first to the last mapping, minus the two largest gaps
    (between heap and mmap area, and between mmap area and stack).

    [vsyscall] is not a VMA of the process in the kernel and is left out.
    """
    spans = sorted((v.start, v.end) for v in vmas if v.path != "[vsyscall]")
    if not spans:
        return []
    if len(spans) < 3:
        return [(s, e) for s, e in _coalesce(spans)]
    gaps = []
    for (_, e0), (s1, _) in zip(spans[:-1], spans[1:], strict=True):
        if s1 > e0:
            gaps.append((s1 - e0, e0, s1))
    gaps.sort(reverse=True)
    big = sorted(gaps[:2], key=lambda g: g[1])
    first, last = spans[0][0], max(e for _, e in spans)
    if len(big) < 2:
        return [(s, e) for s, e in _coalesce(spans)]
    (_, g1s, g1e), (_, g2s, g2e) = big
    return [(first, g1s), (g1e, g2s), (g2e, last)]


def mapped_spans(vmas: list[Vma], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` that some VMA maps, adjacent VMAs coalesced.  The
    three-region heuristic monitors the holes between mappings too (that is how
    DAMON keeps few regions); what is really memory is only this."""
    spans = _coalesce(sorted((v.start, v.end) for v in vmas if v.path != "[vsyscall]"))
    out: list[tuple[int, int]] = []
    j = 0
    for rs, re_ in sorted(ranges):
        while j < len(spans) and spans[j][1] <= rs:
            j += 1
        k = j
        while k < len(spans) and spans[k][0] < re_:
            out.append((max(spans[k][0], rs), min(spans[k][1], re_)))
            k += 1
    return out


NOT_MEMORY = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


def mergeable_spans(vmas: list[Vma], ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` that KSM could merge: private anonymous memory ([heap],
    anonymous mmaps, thread stacks) that can hold data.  Not file-backed mappings (their
    unwritten pages are page cache, which KSM never merges), shared memory (KSM ignores
    VM_SHARED), the kernel's special mappings, inaccessible guard pages, nor the main
    thread's [stack] (in use whenever the program runs; no program advises it
    MADV_MERGEABLE)."""
    keep = [v for v in vmas if v.private and v.anonymous and v.perms[:3] != "---"
            and v.path not in NOT_MEMORY and v.path != "[stack]"]
    return mapped_spans(keep, ranges)


def _coalesce(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def live_thread_ids(pid: int) -> list[int]:
    """The process's threads that have not exited (zombie threads left out), main first."""
    out = []
    for tid in thread_ids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(tid)
    out.sort(key=lambda t: t != pid)
    return out


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None


def vaddr_provider(pid: int):
    """The ranges of a process as DAMON's vaddr operations pick them (three regions over
    /proc/PID/maps) plus the spans really mapped inside them -- the three regions
    include unmapped holes, which reports must not call memory -- and the mergeable
    spans among them (``mergeable_spans``: what KSM could merge).  A callable for
    ``Monitor.add_target(provider=...)``; its ``name`` is the process's, its ``vmas()``
    the VMAs it parsed last (for udamon.core.names).  The maps are parsed again only
    when they changed (they are read once a second)."""
    last: list = [None, None, None]

    def provide() -> tuple[list[tuple[int, int]], ...]:
        text = read_maps_text(pid)
        if text != last[0]:
            vmas = parse_maps(text)
            if not vmas:
                read_vmas(pid)  # says whether the process is gone
            ranges = three_regions(vmas)
            last[:] = [text, (ranges, mapped_spans(vmas, ranges),
                              mergeable_spans(vmas, ranges)), vmas]
        return last[1]

    name = process_name(pid)
    provide.name = "" if name == "?" else name  # type: ignore[attr-defined]
    # the VMAs last parsed (a new list when the maps changed): their names
    provide.vmas = lambda: last[2]  # type: ignore[attr-defined]
    return provide
