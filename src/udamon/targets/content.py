"""Page contents of another process, read with ``process_vm_readv`` and hashed.

What KSM can merge is decided by content, so the KSM advisor reads the pages it
considers -- only resident ones (as ``PAGEMAP_SCAN`` lists them: reading a page
that is not there would fault it in) -- in chunks of up to 4 MiB, and hashes
each 4 KiB page to 64 bits with numpy: a multilinear hash (each 64-bit word
times its own odd constant, summed modulo 2^64) finished by a 64-bit mixer.
For two different pages to collide, a random linear form of their difference
must vanish: about 2^-64, so among the ~10^6 pages of 4 GiB a collision is
expected with probability ~10^-8.  All-zero pages are flagged apart (KSM's
``use_zero_pages`` sends them to the zero page).  The read never writes: the
target's memory and page tables are untouched (bench/analysis.md has its speed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import numpy as np

from udamon.errors import TargetGone

PAGE = 4096
WORDS = PAGE // 8
CHUNK_PAGES = 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t

# fixed constants: the same content hashes the same in every target and every run
_K = (np.random.default_rng(0x5D1F_00D5).integers(0, 1 << 63, WORDS, dtype=np.uint64)
      * np.uint64(2) + np.uint64(1))


def hash_words(words: np.ndarray) -> np.ndarray:
    """64-bit hashes of pages given as (n, 512) uint64 words."""
    with np.errstate(over="ignore"):
        h = (words * _K).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    return h


def read_pages(pid: int, addr: int, buf: np.ndarray, npages: int) -> int:
    """Read ``npages`` pages at ``addr`` of ``pid`` into ``buf``; returns the whole
    pages read (fewer when one went away meanwhile)."""
    local = _Iovec(buf.ctypes.data, npages * PAGE)
    remote = _Iovec(addr, npages * PAGE)
    n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        e = ctypes.get_errno()
        if e == errno.ESRCH:
            raise TargetGone(f"process {pid} has exited")
        if e in (errno.EFAULT, errno.ENOMEM):
            return 0
        raise OSError(e, f"process_vm_readv: {os.strerror(e)}")
    return n // PAGE


def hash_runs(pid: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Hash every page of the runs [lo, hi): (page addresses, hashes, all-zero flags)
    of the pages that could be read."""
    buf = np.empty((CHUNK_PAGES, WORDS), dtype=np.uint64)
    addrs: list[np.ndarray] = []
    hashes: list[np.ndarray] = []
    zeros: list[np.ndarray] = []
    for a, b in zip(np.asarray(lo).tolist(), np.asarray(hi).tolist(), strict=True):
        cur = a
        while cur < b:
            n = min(CHUNK_PAGES, (b - cur) // PAGE)
            got = read_pages(pid, cur, buf, n)
            if got:
                w = buf[:got]
                addrs.append(cur + np.arange(got, dtype=np.uint64) * np.uint64(PAGE))
                hashes.append(hash_words(w))
                zeros.append(~w.any(axis=1))
            # a page that went away ends the chunk short: skip it, go on after it
            cur += (got if got == n else got + 1) * PAGE
    if not addrs:
        z = np.zeros(0, np.uint64)
        return z, z.copy(), np.zeros(0, bool)
    return np.concatenate(addrs), np.concatenate(hashes), np.concatenate(zeros)
