"""Virtual memory areas of a process from /proc/<pid>/maps, and DAMON's
vaddr heuristic that turns them into three monitoring ranges."""

from __future__ import annotations

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
    """/proc/PID/maps as text; raises TargetGone when the process has exited."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
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


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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
        with open(f"/proc/{pid}/comm") as f:
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
    import os

    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None


def vaddr_provider(pid: int):
    """The ranges of a process as DAMON's vaddr operations pick them (three regions over
    /proc/PID/maps) plus the spans really mapped inside them -- the three regions
    include unmapped holes, which reports must not call memory.  A callable for
    ``Monitor.add_target(provider=...)``; its ``name`` is the process's, its ``vmas()``
    the VMAs it parsed last (for udamon.core.names).  The maps are parsed again only
    when they changed (they are read once a second)."""
    last: list = [None, None, None]

    def provide() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        text = read_maps_text(pid)
        if text != last[0]:
            vmas = parse_maps(text)
            if not vmas:
                read_vmas(pid)  # says whether the process is gone
            ranges = three_regions(vmas)
            last[:] = [text, (ranges, mapped_spans(vmas, ranges)), vmas]
        return last[1]

    name = process_name(pid)
    provide.name = "" if name == "?" else name  # type: ignore[attr-defined]
    # the VMAs last parsed (a new list when the maps changed): their names
    provide.vmas = lambda: last[2]  # type: ignore[attr-defined]
    return provide
