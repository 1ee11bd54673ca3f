"""The userfaultfd and PAGEMAP_SCAN kernel ABI the controlled primitives use.

Numbers are from include/uapi/linux/userfaultfd.h and include/uapi/linux/fs.h
of Linux 7.3.  Two protection modes share one sampler (udamon.primitives.uffd):

* **wp** -- async write-protect (Linux 6.7+): a protected page's first *write*
  is resolved by the kernel and clears its uffd bit; ``PAGEMAP_SCAN`` reports
  ``PAGE_IS_WRITTEN`` for it.
* **rwp** -- async read-write protection (Linux 7.3+, ``CONFIG_USERFAULTFD_RWP``):
  the page is made PROT_NONE (the NUMA-hinting mechanism); its first access of
  any kind is resolved by the kernel and ``PAGEMAP_SCAN`` reports
  ``PAGE_IS_ACCESSED``.  Only *present* PTEs can be protected, so the scan also
  asks whether each armed page is populated.

Both protection ioctls take the same 24-byte ``{start, len, mode}`` struct.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from udamon.targets import inject

# include/uapi/linux/userfaultfd.h
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)            24 bytes
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)  32 bytes
UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)    16 bytes
UFFDIO_WRITEPROTECT = 0xC018AA06  # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
UFFDIO_RWPROTECT = 0xC018AA09  # _IOWR(0xAA, 0x09, struct uffdio_rwprotect)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_RWP = 1 << 3
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_RWPROTECT_MODE_RWP = 1 << 0
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_RWP = 1 << 17
UFFD_FEATURE_RWP_ASYNC = 1 << 18

# include/uapi/linux/fs.h
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)           96 bytes
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_ACCESSED = 1 << 9
PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages the scan matches (atomically)
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail when a VMA is not registered for async WP

SCAN_CHUNK = 128 << 20  # FACTS.md: walk_end came back early on a 256 MiB scan
# Armed pages closer than this share one PAGEMAP_SCAN; farther apart, each cluster gets
# its own.  Measured on this project's host (bench/bench_loop.py scan_cost): a call costs
# ~2.7 us and the walk ~9 ns more per page between armed pages (those are unprotected,
# so they match the scan and are reported; 1 ns a page only when nothing matches), so
# joining pays for gaps up to ~1.2 MiB.  In the loop (bench_loop, interleaved and
# rotated) 1 MiB cost 2-20% less per turn than 2 MiB at 10..1000 regions; 8 MiB made a
# 100-region turn 50% dearer.  Never the whole span: that made the cost grow with the
# target's size, where DAMON's must not.
SCAN_JOIN = 1 << 20
VEC_LEN = 4096


@dataclass(frozen=True)
class Mode:
    """What differs between write-protect and read-write-protect sampling."""

    name: str
    required: int  # UFFDIO_API features that must be granted
    optional: int  # ... asked for where the kernel has them
    register: int  # UFFDIO_REGISTER mode
    protect_cmd: int  # the protection ioctl
    protect_flag: int  # its "protect" mode bit
    hit: int  # PAGEMAP_SCAN category of an armed page that was accessed since arming
    # categories of a page that can be observed (populated); 0: every page can be
    # (wp: WP_UNPOPULATED protects holes too)
    populated: int
    kernel: str  # the first kernel that has it, for error messages

    @property
    def scan_masks(self) -> tuple[int, int, int]:
        """(category_mask, category_anyof_mask, return_mask) of the scan after a turn."""
        if self.populated:
            return 0, self.populated, self.hit | self.populated
        return self.hit, 0, self.hit

    @property
    def access(self) -> str:
        return "write" if self.name == "wp" else "access"


WP = Mode("wp", UFFD_FEATURE_WP_ASYNC,
          UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_THREAD_ID,
          UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT, UFFDIO_WRITEPROTECT_MODE_WP,
          PAGE_IS_WRITTEN, 0, "6.7")
RWP = Mode("rwp", UFFD_FEATURE_RWP | UFFD_FEATURE_RWP_ASYNC, UFFD_FEATURE_THREAD_ID,
           UFFDIO_REGISTER_MODE_RWP, UFFDIO_RWPROTECT, UFFDIO_RWPROTECT_MODE_RWP,
           PAGE_IS_ACCESSED, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, "7.3")
MODES = {m.name: m for m in (WP, RWP)}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class PmScanArg(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "size flags start end walk_end vec vec_len max_pages category_inverted "
            "category_mask category_anyof_mask return_mask"
        ).split()
    ]


assert ctypes.sizeof(PmScanArg) == 96


def ioctl_ptr(fd: int, req: int, arg: ctypes.Structure) -> int:
    """ioctl with a ctypes struct; returns the result, -errno on failure."""
    n = _libc.ioctl(fd, req, ctypes.byref(arg))
    return n if n >= 0 else -ctypes.get_errno()


def uffd_api(fd: int, features: int) -> int:
    """UFFDIO_API; returns the features the kernel granted (all it has when asked for 0)."""
    buf = bytearray(struct.pack("<QQQ", UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, buf)
    return struct.unpack_from("<Q", buf, 8)[0]


def self_uffd() -> int:
    flags = inject.O_CLOEXEC | inject.O_NONBLOCK
    try:
        return inject._syscall(inject.NR_USERFAULTFD, flags)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        return inject._syscall(inject.NR_USERFAULTFD, flags | inject.UFFD_USER_MODE_ONLY)


def kernel_features() -> int:
    """The userfaultfd features this kernel has, probed the way the kernel documents it:
    a throwaway uffd and UFFDIO_API with features 0 (asking for a feature the kernel
    lacks fails with EINVAL and zeroes the struct, so that cannot be used to probe)."""
    fd = self_uffd()
    try:
        return uffd_api(fd, 0)
    finally:
        os.close(fd)


def missing_feature(mode: Mode, features: int) -> str | None:
    """Why ``mode`` cannot run with these kernel features, or None."""
    lacking = mode.required & ~features
    if not lacking:
        return None
    if mode is RWP:
        return (f"the kernel has no userfaultfd RWP (UFFD_FEATURE_RWP/RWP_ASYNC missing from "
                f"features {features:#x}): it needs Linux {mode.kernel}+ built with "
                "CONFIG_USERFAULTFD_RWP")
    return (f"kernel lacks UFFD_FEATURE_WP_ASYNC (features {features:#x}; needs Linux "
            f"{mode.kernel}+)")
