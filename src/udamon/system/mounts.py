"""mount(2)/umount2(2) through ctypes, and whether a path is a mount point:
tracefs and debugfs are mounted on demand by the primitives that need them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def is_mounted(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(len(p) > 1 and p[1] == path for p in (ln.split() for ln in f))
    except OSError:
        return False


def mount(fstype: str, target: str, source: str = "nodev") -> None:
    """Raise OSError (with the mount in the message) when it fails."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {target}: {os.strerror(e)}")


def umount(target: str) -> None:
    _libc.umount2(target.encode(), 0)
