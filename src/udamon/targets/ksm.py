"""The kernel's KSM as udamon sees it: settings, per-process counts, merged pages.

* ``/sys/kernel/mm/ksm/*``: whether ksmd runs (``run``), how fast it scans
  (``pages_to_scan`` per ``sleep_millisecs``), ``use_zero_pages`` (all-zero pages
  go to the kernel's zero page, counted apart as ``ksm_zero_pages``) and
  ``max_page_sharing`` (at most that many sharers per KSM page);
* ``/proc/PID/ksm_stat`` (Linux 6.1+; ``ksm_merging_pages`` alone since 5.19):
  the process's pages merged, its zero pages, its profit;
* which pages of a range are KSM pages: ``/proc/PID/pagemap`` gives each page's
  PFN (root), ``/proc/kpageflags`` its flags, bit 21 ``KPF_KSM``;
* which other processes offer memory to KSM (``ksm_mergeable`` in ksm_stat,
  Linux 6.8+, else an ``mg`` in their smaps VmFlags): changing KSM's global
  settings changes how their memory is merged too.
"""

from __future__ import annotations

import os

import numpy as np

from udamon.errors import RuntimeFailure, TargetGone

KSM_DIR = "/sys/kernel/mm/ksm"
KPF_KSM = 21
PM_PFN_MASK = (1 << 55) - 1
PM_PRESENT = 1 << 63
PAGE = 4096
SETTINGS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
            "merge_across_nodes")


def available() -> tuple[bool, str]:
    if not os.path.isdir(KSM_DIR):
        return False, f"the kernel has no KSM ({KSM_DIR} is missing: CONFIG_KSM)"
    return True, KSM_DIR


def read_setting(name: str) -> str:
    with open(os.path.join(KSM_DIR, name)) as f:
        return f.read().strip()


def settings() -> dict[str, int]:
    out = {}
    for name in SETTINGS:
        try:
            out[name] = int(read_setting(name))
        except (OSError, ValueError):
            pass
    return out


def counters() -> dict[str, int]:
    """The global counters (pages_shared, pages_sharing, full_scans, ...)."""
    out = {}
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "full_scans", "ksm_zero_pages", "general_profit"):
        try:
            out[name] = int(read_setting(name))
        except (OSError, ValueError):
            pass
    return out


def ksm_stat(pid: int) -> dict[str, int | bool]:
    """/proc/PID/ksm_stat as numbers (yes/no as booleans); {} when the kernel has
    neither it nor ksm_merging_pages."""
    out: dict[str, int | bool] = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                k, _, v = line.replace(":", " ").partition(" ")
                v = v.strip()
                out[k] = v == "yes" if v in ("yes", "no") else int(v)
        return out
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise TargetGone(f"process {pid} has exited") from None
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/ksm_merging_pages") as f:
            out["ksm_merging_pages"] = int(f.read().strip())
    except (OSError, ValueError):
        pass
    return out


def mergeable_processes(exclude: set[int] | None = None) -> list[tuple[int, str]]:
    """Processes (other than ``exclude``) with memory offered to KSM."""
    exclude = exclude or set()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        pid = int(name)
        yes = False
        try:
            with open(f"/proc/{pid}/ksm_stat") as f:
                text = f.read()
            yes = "ksm_mergeable: yes" in text or "ksm_merge_any: yes" in text
        except FileNotFoundError:
            try:
                with open(f"/proc/{pid}/smaps") as f:
                    yes = any(line.startswith("VmFlags:") and " mg" in line for line in f)
            except OSError:
                continue
        except OSError:
            continue
        if yes:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            out.append((pid, comm))
    return out


def page_flags(pid: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """For each page of [lo, hi) of ``pid``: (present, KSM) booleans, through the
    PFNs of /proc/PID/pagemap and /proc/kpageflags (root only: PFNs are hidden
    otherwise)."""
    n = (hi - lo) // PAGE
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            raw = os.pread(f.fileno(), n * 8, (lo // PAGE) * 8)
    except FileNotFoundError:
        raise TargetGone(f"process {pid} has exited") from None
    ent = np.frombuffer(raw, dtype=np.uint64)
    present = (ent & np.uint64(PM_PRESENT)) != 0
    pfn = ent & np.uint64(PM_PFN_MASK)
    ksm = np.zeros(ent.size, dtype=bool)
    idx = np.flatnonzero(present & (pfn != 0))
    if present.any() and idx.size == 0:
        raise RuntimeFailure("page frame numbers are hidden (/proc/PID/pagemap needs "
                             "CAP_SYS_ADMIN to show them)")
    if idx.size:
        try:
            fd = os.open("/proc/kpageflags", os.O_RDONLY)
        except OSError as e:
            raise RuntimeFailure(f"cannot read /proc/kpageflags: {e.strerror}") from None
        try:
            for i in idx.tolist():
                fl = int.from_bytes(os.pread(fd, 8, int(pfn[i]) * 8), "little")
                ksm[i] = bool(fl >> KPF_KSM & 1)
        finally:
            os.close(fd)
    return present, ksm
