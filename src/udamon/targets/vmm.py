"""Telling a VMM's guest RAM from the VMM's own memory (QEMU, Firecracker, cloud-hypervisor).

Live migration sends the guest's RAM; the VMM's heap, stacks and (TCG) code
cache are not migrated as RAM, and they are written all the time.  So the dirty
rate of a VM is its guest RAM's, and udamon tells the RAM-backing mappings
apart from ``/proc/PID/smaps`` (mapping flags) and, where the rule needs it,
the command line.  Candidates are writable, non-executable mappings of at least
1 MiB that are anonymous and private, or shared memory (memfd, /dev/shm,
hugetlbfs: a file-backed memory backend).  Among them:

* **QEMU** (``qemu-system-*``, ``qemu-kvm``): every RAM block is madvised
  ``MADV_HUGEPAGE`` (VmFlags ``hg``) and, with ``mem-merge`` (the default),
  ``MADV_MERGEABLE`` (``mg``); the candidates with either flag are the RAM blocks
  (guest RAM, and the small ROM/VRAM blocks QEMU also migrates).
* **cloud-hypervisor**: guest memory is madvised ``MADV_HUGEPAGE`` unless
  ``thp=off``, and shared memory is a memfd named ``ch_ram``: those.
* **Firecracker**: each guest memory region is mapped between two guard pages
  (``PROT_NONE`` mappings right before and after it): those.

When a rule finds nothing (a VMM built differently), the candidates of 16 MiB
or more are taken, and the output says so; ``--range`` overrides all of this.
Exercised live with QEMU 7.2 (tests/test_dirty_vm.py); the Firecracker and
cloud-hypervisor rules are tested on constructed ``smaps`` text only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from udamon.errors import TargetGone

MIN_CANDIDATE = 1 << 20
FALLBACK_MIN = 16 << 20
SHARED_PREFIXES = ("/memfd:", "/dev/shm/", "/dev/hugepages", "/hugetlbfs", "/SYSV")

KINDS = {  # kind: names of the executable (comm is cut at 15 characters)
    "qemu": ("qemu-system-", "qemu-kvm"),
    "firecracker": ("firecracker",),
    "cloud-hypervisor": ("cloud-hypervisor", "cloud-hyperviso"),
}


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    inode: int
    path: str
    flags: frozenset[str]

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class VmmInfo:
    kind: str  # "qemu", "firecracker", "cloud-hypervisor"
    ram: tuple[tuple[int, int], ...]  # guest RAM spans, sorted
    how: str  # one line: which rule found them

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ram": [[s, e] for s, e in self.ram], "how": self.how}


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of a /proc/PID/smaps text, with their VmFlags."""
    out: list[Mapping] = []
    cur: list = []
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            if cur:
                out.append(Mapping(*cur, frozenset()))
            parts = line.split(None, 5)
            lo, _, hi = parts[0].partition("-")
            cur = [int(lo, 16), int(hi, 16), parts[1], int(parts[4]),
                   parts[5].strip() if len(parts) > 5 else ""]
        elif head == "VmFlags:" and cur:
            out.append(Mapping(*cur, frozenset(line.split()[1:])))
            cur = []
    if cur:
        out.append(Mapping(*cur, frozenset()))
    return out


def kind_of(comm: str, exe: str) -> str | None:
    names = (comm, os.path.basename(exe))
    for kind, prefixes in KINDS.items():
        if any(n.startswith(p) for n in names for p in prefixes if n):
            return kind
    return None


def _candidate(m: Mapping) -> bool:
    if "w" not in m.perms or "x" in m.perms or m.size < MIN_CANDIDATE:
        return False
    if m.perms[3:4] == "p":
        return m.inode == 0 and (m.path == "" or m.path.startswith("[anon:"))
    return m.path.startswith(SHARED_PREFIXES)


def _guarded(maps: list[Mapping], i: int) -> bool:
    """Mapping i sits between two PROT_NONE mappings that touch it."""
    if i == 0 or i + 1 >= len(maps):
        return False
    prev, m, nxt = maps[i - 1], maps[i], maps[i + 1]
    return (prev.end == m.start and nxt.start == m.end and prev.perms.startswith("---")
            and nxt.perms.startswith("---"))


def detect_from(kind: str, maps: list[Mapping]) -> VmmInfo:
    """The guest RAM of a VMM of ``kind`` among ``maps`` (sorted by address)."""
    maps = sorted(maps, key=lambda m: m.start)
    cands = [i for i, m in enumerate(maps) if _candidate(m)]
    found: list[int] = []
    how = ""
    if kind == "qemu":
        found = [i for i in cands if maps[i].flags & {"hg", "mg"}]
        how = "RAM blocks: mappings madvised MADV_HUGEPAGE/MADV_MERGEABLE"
    elif kind == "cloud-hypervisor":
        found = [i for i in cands if "hg" in maps[i].flags or "ch_ram" in maps[i].path]
        how = "guest memory: mappings madvised MADV_HUGEPAGE or the ch_ram memfd"
    elif kind == "firecracker":
        found = [i for i in cands if _guarded(maps, i)]
        how = "guest memory regions: mappings between two guard pages"
    if not found:
        found = [i for i in cands if maps[i].size >= FALLBACK_MIN]
        how = ("no mapping matched the VMM's rule: taking the anonymous/shared mappings of "
               f">= {FALLBACK_MIN >> 20} MiB (use --range to say where guest RAM is)")
    ram = tuple((maps[i].start, maps[i].end) for i in found)
    n = len(ram)
    return VmmInfo(kind, ram, f"{how}; {n} mapping{'s' if n != 1 else ''}")


def detect(pid: int) -> VmmInfo | None:
    """The guest RAM of process ``pid`` when it is a known VMM, else None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    kind = kind_of(comm, exe)
    if kind is None:
        return None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
    except OSError:
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None
    return detect_from(kind, parse_smaps(text))
