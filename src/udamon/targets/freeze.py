"""Hold every thread of a process in a ptrace stop for a moment (a "freeze").

Why: ``UFFDIO_REGISTER`` splits any VMA its range cuts into.  A range read from
``/proc/<pid>/maps`` can be stale by the time it is registered (the target
unmapped it and mapped something else that straddles its edge), and a VMA
split that way makes the target's own ``mremap()`` of its mapping fail with
``EFAULT`` (seen in the churn test, about 1 run in 15 under load).  While every
thread of the target is stopped its address space cannot change, so maps read
inside a freeze are exact when they are registered.

Safety: a stopped thread keeps its registers untouched and is only delayed.
If udamon dies during a freeze the kernel detaches and resumes every thread.
A signal that arrives during the freeze is passed on when the thread is
released.  A thread that does not stop within the timeout (a parent blocked in
``vfork``, a long uninterruptible sleep) aborts the freeze: the others are
released at once and the straggler is released as soon as it reaches its stop
(``release_stragglers()``, called on every freeze and by the primitive's poll).

Not covered: another process sharing the mm (a ``vfork`` child, ``CLONE_VM``
without ``CLONE_THREAD``) keeps running.
"""

from __future__ import annotations

import errno
import os
import time

from udamon.errors import RuntimeFailure, TargetGone
from udamon.targets.procmaps import live_thread_ids
from udamon.targets.ptrace import (
    PTRACE_DETACH,
    PTRACE_INTERRUPT,
    PTRACE_SEIZE,
    WALL,
    Gone,
    is_signal_delivery_stop,
    perm_message,
    ptrace,
)

DEFAULT_TIMEOUT_S = 0.1

# Threads we seized whose stop did not come in time: released when they stop.
_STRAGGLERS: set[int] = set()


class FreezeFailed(Exception):
    """Not every thread stopped in time; nothing is held any more."""


def _live_tids(pid: int) -> list[int]:
    try:
        return live_thread_ids(pid)
    except TargetGone:
        raise TargetGone(f"process {pid} has exited") from None


def _poll_stop(tid: int) -> tuple[bool, int] | None:
    """None while ``tid`` runs; (stopped, signal to pass on) once it stopped or exited."""
    try:
        r, status = os.waitpid(tid, WALL | os.WNOHANG)
    except ChildProcessError:
        return (False, 0)
    if r == 0:
        return None
    if os.WIFSTOPPED(status):
        return (True, os.WSTOPSIG(status) if is_signal_delivery_stop(status) else 0)
    return (False, 0)  # exited


def _detach(tid: int, sig: int) -> None:
    try:
        ptrace(PTRACE_DETACH, tid, 0, sig)
    except (Gone, OSError):
        pass  # killed meanwhile (SIGKILL ends the stop) or already gone


def release_stragglers() -> int:
    """Detach seized threads that have reached their stop since; return how many remain."""
    for tid in list(_STRAGGLERS):
        got = _poll_stop(tid)
        if got is None:
            continue
        _STRAGGLERS.discard(tid)
        stopped, sig = got
        if stopped:
            _detach(tid, sig)
    return len(_STRAGGLERS)


class Freezer:
    """``with Freezer(pid):`` every live thread of ``pid`` is in a ptrace stop inside."""

    def __init__(self, pid: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.pid = pid
        self.timeout_s = timeout_s
        self.held: dict[int, int] = {}  # tid -> signal to pass on at release
        self.elapsed_s = 0.0  # from the first ptrace call to the last thread let go
        self.held_s = 0.0  # from the first thread seen stopped to the last let go (its cost)
        self._first_stop = 0.0

    def __enter__(self) -> Freezer:
        release_stragglers()
        t0 = time.perf_counter()
        waiting: set[int] = set()
        try:
            self._freeze(waiting, t0 + self.timeout_s)
        except BaseException:
            _STRAGGLERS.update(waiting)
            self._release()
            raise
        self._t0 = t0
        return self

    def _freeze(self, waiting: set[int], deadline: float) -> None:
        while True:
            # Threads created before the others stopped show up here; once all
            # known threads are stopped, nobody is left to create new ones.
            new = [t for t in _live_tids(self.pid) if t not in self.held and t not in waiting]
            if not new and not waiting:
                return
            for tid in new:
                try:
                    ptrace(PTRACE_SEIZE, tid, 0, 0)
                except Gone:
                    continue
                except OSError as e:
                    if e.errno == errno.EPERM and tid not in _live_tids(self.pid):
                        continue  # became a zombie meanwhile
                    if e.errno in (errno.EPERM, errno.EACCES):
                        raise RuntimeFailure(perm_message(self.pid, e)) from None
                    raise RuntimeFailure(f"ptrace(SEIZE, {tid}) failed: {e.strerror}") from None
                waiting.add(tid)
                try:
                    ptrace(PTRACE_INTERRUPT, tid)
                except Gone:
                    pass  # exiting: its exit shows up in the wait below
            spins = 0
            while waiting:
                for tid in list(waiting):
                    got = _poll_stop(tid)
                    if got is None:
                        continue
                    waiting.discard(tid)
                    if got[0]:
                        self.held[tid] = got[1]
                        self._first_stop = self._first_stop or time.perf_counter()
                if not waiting:
                    break
                if time.perf_counter() > deadline:
                    raise FreezeFailed(
                        f"{len(waiting)} thread(s) of process {self.pid} did not stop within "
                        f"{self.timeout_s * 1e3:.0f} ms (in vfork or uninterruptible sleep?)"
                    )
                spins += 1
                time.sleep(0 if spins < 50 else 0.0002)

    def __exit__(self, *exc: object) -> None:
        self._release()
        now = time.perf_counter()
        self.elapsed_s = now - self._t0
        self.held_s = now - (self._first_stop or now)

    def _release(self) -> None:
        held, self.held = self.held, {}
        for tid, sig in held.items():
            _detach(tid, sig)
