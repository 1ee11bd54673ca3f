"""What a process's memory and threads are called, read from /proc: the mapping name
of each VMA (as /proc/PID/maps shows it) and each thread's comm.

Mapping names: a file's path; ``[heap]``, ``[stack]``, ``[vdso]``, ``[vvar]``;
``[anon:NAME]`` for anonymous memory named with prctl(PR_SET_VMA_ANON_NAME)
(Linux >= 5.17 with CONFIG_ANON_VMA_NAME); ``memfd:NAME`` for a memfd_create()
mapping (maps says ``/memfd:NAME (deleted)``: it never had a path); ``[anon]``
for anonymous memory without a name.  Other ``(deleted)`` files keep maps' text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from udamon.targets.procmaps import Vma

ANON = "[anon]"
NamedSpan = tuple[int, int, str]


def vma_name(v: Vma) -> str:
    """The name a report shows for the mapping ``v``."""
    path = v.path
    if not path:
        return ANON
    if path.startswith("/memfd:"):
        return path[1:].removesuffix(" (deleted)")
    return path


def named_spans(vmas: Iterable[Vma]) -> list[NamedSpan]:
    """``(start, end, name)`` of the process's mappings in address order, adjacent
    mappings of the same name joined (a library's text, data and bss are one span;
    a file mapped twice in a row, too).  [vsyscall] is not a VMA of the process."""
    out: list[list] = []
    for v in sorted(vmas, key=lambda x: x.start):
        if v.path == "[vsyscall]":
            continue
        name = vma_name(v)
        if out and out[-1][1] == v.start and out[-1][2] == name:
            out[-1][1] = v.end
        else:
            out.append([v.start, v.end, name])
    return [(int(s), int(e), str(n)) for s, e, n in out]


def thread_comm(pid: int, tid: int) -> str | None:
    """/proc/PID/task/TID/comm (the thread's name, pthread_setname_np or PR_SET_NAME;
    the process's name until it sets one); None when the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return None


def task_ids(pid: int) -> set[int] | None:
    """The thread ids of a process now (None when it is gone)."""
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit()}
    except OSError:
        return None
