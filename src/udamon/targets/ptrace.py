"""ptrace plumbing shared by the syscall injector and the process freezer (ctypes).

Both hold threads of a target in ptrace stops; this module only wraps the
system calls and the wait-status decoding.  The arch-specific register
layout lives in ``inject``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACESYSGOOD = 1
PTRACE_EVENT_STOP = 128
WALL = 0x40000000
SYSCALL_STOP = signal.SIGTRAP | 0x80

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_ptrace_fn = _libc.ptrace
_ptrace_fn.restype = ctypes.c_long
_ptrace_fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class Gone(Exception):
    """The traced thread exited (or was killed) under us."""


def ptrace(req: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    """ptrace(2); ESRCH becomes Gone, other errors OSError."""
    ctypes.set_errno(0)
    r = _ptrace_fn(req, tid, addr, data)
    if r == -1:
        e = ctypes.get_errno()
        if e:
            if e == errno.ESRCH:
                raise Gone()
            raise OSError(e, os.strerror(e))
    return r


def syscall(nr: int, *args: int) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def is_event_stop(status: int) -> bool:
    return (status >> 16) == PTRACE_EVENT_STOP


def is_signal_delivery_stop(status: int) -> bool:
    """A stop that carries a signal for the thread (to be passed on when resuming)."""
    return os.WIFSTOPPED(status) and (status >> 16) == 0 and os.WSTOPSIG(status) != SYSCALL_STOP


def perm_message(pid: int, e: OSError) -> str:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "n/a"
    return (
        f"ptrace of process {pid} not permitted ({e.strerror}): needs root or CAP_SYS_PTRACE "
        f"and kernel.yama.ptrace_scope < 3 (ptrace_scope={scope}); is it already traced?"
    )
