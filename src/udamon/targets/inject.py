"""Run a system call inside another process with ptrace (pure Python, ctypes).

The use: create a ``userfaultfd`` *inside* a target process and take it with
``pidfd_getfd`` (DESIGN.md, the wp primitive).  The sequence (FACTS.md,
"ptrace syscall injection"):

1. refuse when the target runs under seccomp (an injected syscall the filter
   does not allow can kill it with SIGSYS) or is not a 64-bit x86 process;
2. ``PTRACE_SEIZE`` one live thread (the fd table is shared by all threads,
   so one is enough; the others keep running) and ``PTRACE_INTERRUPT`` it;
3. save its registers, point ``rip`` at a ``syscall`` instruction (``0f 05``)
   in the target's ``[vdso]`` (or at ``rip - 2`` when it stopped in a syscall),
   load the syscall number and arguments, and run exactly that syscall with
   two ``PTRACE_SYSCALL`` stops (entry, exit);
4. put the saved registers back *unchanged* and let the thread pass through
   one more ``PTRACE_INTERRUPT`` stop before detaching.  That last stop sits in
   the kernel's signal path (``get_signal``), so on detach the kernel applies
   its own syscall-restart rules to the original registers
   (``-ERESTARTSYS`` & co. -> restart, ``-ERESTART_RESTARTBLOCK`` ->
   ``restart_syscall``, ``-EINTR`` stays ``-EINTR``): a target interrupted in
   ``read``/``nanosleep``/``futex``/``poll`` carries on as if nothing happened.
   Without it the thread would return to user space from the injected
   syscall's exit stop and see ``-512`` in ``rax``.

Signals that arrive while the injection regs are loaded are held back and
sent again (``tgkill``) after the detach.  The arch-specific part is the
register layout and the three syscall numbers below.

A tracer that dies while the target's registers point into the vDSO leaves
the target with those registers (ptrace has no "restore on tracer death").
So udamon does not inject from its own process: ``inject_userfaultfd_isolated``
runs the injection in a short-lived helper process (``python -m
udamon.targets.inject``, its own session, SIGINT/SIGTERM ignored) that hands
the uffd back over a unix socket.  If udamon is SIGKILLed meanwhile, the
helper still finishes and restores the registers, then exits (closing the
uffd).  Only a SIGKILL of the helper itself inside the injection (e.g. killing
udamon's whole cgroup) is not covered.  ``UDAMON_TEST_INJECT_PAUSE_S`` (tests
only) holds the target with the injected registers for that long, to widen
the window on purpose.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from udamon.errors import RuntimeFailure, TargetGone
from udamon.targets.procmaps import is_alive, live_thread_ids
from udamon.targets.ptrace import (
    PTRACE_CONT,
    PTRACE_DETACH,
    PTRACE_GETREGS,
    PTRACE_INTERRUPT,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_SEIZE,
    PTRACE_SETREGS,
    PTRACE_SYSCALL,
    SYSCALL_STOP,
    WALL,
)
from udamon.targets.ptrace import Gone as _Gone
from udamon.targets.ptrace import is_event_stop as _is_event_stop
from udamon.targets.ptrace import perm_message as _perm_message
from udamon.targets.ptrace import ptrace as _ptrace
from udamon.targets.ptrace import syscall as _syscall

# ------------------------------------------------------------ x86_64 specifics

ARCH = "x86_64"
NR_CLOSE = 3
NR_RESTART_SYSCALL = 219
NR_USERFAULTFD = 323
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438
NR_TGKILL = 234
USER_CS_64 = 0x33  # %cs of a 64-bit user process (0x23 for 32-bit compat)
SYSCALL_INSN = b"\x0f\x05"


class UserRegs(ctypes.Structure):
    """struct user_regs_struct (arch/x86/include/asm/user_64.h)."""

    _fields_ = [
        (n, ctypes.c_ulonglong)
        for n in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]

    def copy(self) -> UserRegs:
        r = UserRegs()
        ctypes.memmove(ctypes.byref(r), ctypes.byref(self), ctypes.sizeof(UserRegs))
        return r

    def raw(self) -> bytes:
        return bytes(memoryview(self).cast("B"))


assert ctypes.sizeof(UserRegs) == 27 * 8
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def _load_syscall(regs: UserRegs, insn: int, nr: int, args: tuple[int, ...]) -> None:
    regs.rip = insn
    regs.rax = nr
    regs.orig_rax = (1 << 64) - 1  # -1: "not in a syscall", no restart fix-up on resume
    for name, val in zip(_ARG_REGS, args, strict=False):
        setattr(regs, name, val & ((1 << 64) - 1))


def _result(regs: UserRegs) -> int:
    v = regs.rax
    return v - (1 << 64) if v >= 1 << 63 else v


# ------------------------------------------------------------ ptrace plumbing

NR_PTRACE = 101


def _getregs(tid: int) -> UserRegs:
    regs = UserRegs()
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def _setregs(tid: int, regs: UserRegs) -> None:
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def _wait(tid: int) -> int:
    """Wait for the next stop of the tracee; raise _Gone when it exited."""
    while True:
        try:
            _, status = os.waitpid(tid, WALL)
        except ChildProcessError:
            raise _Gone() from None
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if os.WIFSTOPPED(status):
            return status
        raise _Gone()


# ------------------------------------------------------------ checks


def _status_fields(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(f"process {pid} does not exist (or has exited)") from None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def check_injectable(pid: int) -> None:
    """Raise RuntimeFailure/TargetGone (one line) when we must not inject into ``pid``."""
    if platform.machine() != ARCH:
        raise RuntimeFailure(
            f"syscall injection is only implemented for {ARCH} (this is {platform.machine()})"
        )
    if pid == os.getpid():
        raise RuntimeFailure("cannot inject a syscall into udamon itself")
    st = _status_fields(pid)
    if st.get("State", "").startswith(("Z", "X")) and not is_alive(pid):
        raise TargetGone(f"process {pid} has exited")  # (a zombie leader's threads may run)
    if st.get("Tgid") and int(st["Tgid"]) != pid:
        raise RuntimeFailure(
            f"{pid} is a thread id, not a process id (its process is {st['Tgid']})"
        )
    mode = st.get("Seccomp", "0")
    if mode != "0":
        kind = {"1": "strict", "2": "filter"}.get(mode, mode)
        raise RuntimeFailure(
            f"process {pid} runs under seccomp ({kind} mode): injecting a syscall could kill it, "
            "so udamon refuses"
        )


def _task_path(pid: int, tid: int | None, name: str) -> str:
    """/proc/PID/NAME, or the thread's own file when ``tid`` is another thread (the main
    thread may have exited: a zombie leader's files show no memory)."""
    if tid is None or tid == pid:
        return f"/proc/{pid}/{name}"
    return f"/proc/{pid}/task/{tid}/{name}"


def _pick_thread(pid: int) -> int:
    """The main thread if it is alive, else any live thread."""
    try:
        tids = live_thread_ids(pid)
    except TargetGone:
        raise TargetGone(f"process {pid} has exited") from None
    if not tids:
        raise TargetGone(f"process {pid} has no live thread")
    return tids[0]


def _find_syscall_insn(pid: int, memfd: int, tid: int | None = None) -> int | None:
    try:
        with open(_task_path(pid, tid, "maps")) as f:
            for line in f:
                if line.rstrip().endswith("[vdso]"):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    data = os.pread(memfd, hi - lo, lo)
                    i = data.find(SYSCALL_INSN)
                    if i >= 0:
                        return lo + i
    except OSError:
        pass
    return None


# ------------------------------------------------------------ the injector


_TEST_PAUSE_S = float(os.environ.get("UDAMON_TEST_INJECT_PAUSE_S") or 0)


@dataclass
class InjectStats:
    cycles: int = 0
    last_us: float = 0.0


STATS = InjectStats()


class Injector:
    """A thread of ``pid`` held in a ptrace stop; ``call()`` runs syscalls in it.

    Use as a context manager: on exit the registers are restored, the thread
    is detached and held-back signals are re-sent.  ``on_stopped`` work (e.g.
    ``pidfd_getfd``) must happen inside the ``with`` block.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tid = -1
        self._seized = False
        self._saved: UserRegs | None = None
        self._dirty = False  # the thread's registers are not its own right now
        self._insn: int | None = None
        self._memfd = -1
        self._held: list[int] = []
        self._t0 = 0.0

    # -- attach --------------------------------------------------------

    def __enter__(self) -> Injector:
        check_injectable(self.pid)
        self._t0 = time.perf_counter()
        self.tid = _pick_thread(self.pid)
        try:
            _ptrace(PTRACE_SEIZE, self.tid, 0, PTRACE_O_TRACESYSGOOD)
        except _Gone:
            raise TargetGone(f"process {self.pid} exited before it could be attached") from None
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise RuntimeFailure(_perm_message(self.pid, e)) from None
            raise RuntimeFailure(f"ptrace(SEIZE, {self.tid}) failed: {e.strerror}") from None
        self._seized = True
        try:
            self._stop()
            # through the stopped thread: a zombie leader's /proc/PID/mem has no memory
            self._memfd = os.open(_task_path(self.pid, self.tid, "mem"),
                                  os.O_RDONLY | os.O_CLOEXEC)
        except BaseException as e:
            self._release()
            if isinstance(e, _Gone):
                raise TargetGone(f"process {self.pid} exited during attach") from None
            if isinstance(e, FileNotFoundError | ProcessLookupError):
                raise TargetGone(f"process {self.pid} exited during attach") from None
            raise
        return self

    def _stop(self) -> None:
        _ptrace(PTRACE_INTERRUPT, self.tid)
        while True:
            status = _wait(self.tid)
            sig = os.WSTOPSIG(status)
            if _is_event_stop(status):
                if sig != signal.SIGTRAP:  # group-stop: the process is stopped (SIGSTOP)
                    raise RuntimeFailure(
                        f"process {self.pid} is stopped (signal {sig}); continue it first"
                    )
                break
            # A signal-delivery-stop that raced with the interrupt: deliver it
            # normally (registers are still the thread's own) and stop again.
            _ptrace(PTRACE_CONT, self.tid, 0, 0 if sig == SYSCALL_STOP else sig)
        self._saved = _getregs(self.tid)
        if self._saved.cs != USER_CS_64:
            raise RuntimeFailure(
                f"process {self.pid} is not a 64-bit {ARCH} process (cs={self._saved.cs:#x})"
            )

    # -- running syscalls ----------------------------------------------

    def _syscall_insn(self) -> int:
        if self._insn is None:
            self._insn = _find_syscall_insn(self.pid, self._memfd, self.tid)
        if self._insn is None:
            saved = self._saved
            assert saved is not None
            if saved.orig_rax < 1 << 63:  # stopped in a syscall: rip - 2 is one
                try:
                    if os.pread(self._memfd, 2, saved.rip - 2) == SYSCALL_INSN:
                        self._insn = saved.rip - 2
                except OSError:
                    pass
        if self._insn is None:
            raise RuntimeFailure(
                f"no syscall instruction found in process {self.pid} (no [vdso]?)"
            )
        return self._insn

    def _resume_to(self) -> UserRegs:
        """PTRACE_SYSCALL until the next syscall stop; hold back signals meanwhile."""
        sig = 0
        while True:
            _ptrace(PTRACE_SYSCALL, self.tid, 0, sig)
            sig = 0
            status = _wait(self.tid)
            s = os.WSTOPSIG(status)
            if s == SYSCALL_STOP and not _is_event_stop(status):
                return _getregs(self.tid)
            if _is_event_stop(status):
                continue  # a late interrupt/group stop: keep going
            self._held.append(s)  # signal-delivery-stop: suppress now, re-send later

    def call(self, nr: int, *args: int) -> int:
        """Run syscall ``nr`` in the stopped thread; return its raw result (-errno on error)."""
        assert self._saved is not None
        try:
            regs = self._saved.copy()
            _load_syscall(regs, self._syscall_insn(), nr, args)
            self._dirty = True
            _setregs(self.tid, regs)
            if _TEST_PAUSE_S:
                time.sleep(_TEST_PAUSE_S)
            entry = self._resume_to()
            if entry.orig_rax != nr:
                raise RuntimeFailure(
                    f"injection into {self.pid}: stopped in syscall {entry.orig_rax}, not {nr}"
                )
            out = self._resume_to()
            return _result(out)
        except _Gone:
            self._seized = False
            self._abandon()
            raise TargetGone(f"process {self.pid} exited or exec'd during syscall injection"
                             ) from None

    # -- detach --------------------------------------------------------

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _abandon(self) -> None:
        """The seized thread vanished: it exited, or it exec'd, in which case the kernel
        gave its tracee state to the process's leader tid.  Never leave any thread of
        the process stopped under our trace (it would hang)."""
        for tid in dict.fromkeys((self.pid, self.tid)):
            _abandon_tid(tid)

    def _release(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        if not self._seized:
            return
        self._seized = False
        try:
            if self._dirty and self._saved is not None:
                _setregs(self.tid, self._saved)
                # One more stop inside get_signal so that the kernel's restart
                # logic sees the original registers when the thread resumes.
                _ptrace(PTRACE_INTERRUPT, self.tid)
                _ptrace(PTRACE_CONT, self.tid, 0, 0)
                while True:
                    status = _wait(self.tid)
                    if _is_event_stop(status):
                        break
                    s = os.WSTOPSIG(status)
                    if s != SYSCALL_STOP:
                        self._held.append(s)
                    _ptrace(PTRACE_CONT, self.tid, 0, 0)
                self._dirty = False
            _ptrace(PTRACE_DETACH, self.tid, 0, 0)
        except _Gone:
            self._abandon()
            return
        for s in self._held:
            try:
                _syscall(NR_TGKILL, self.pid, self.tid, s)
            except OSError:
                pass
        self._held = []
        STATS.cycles += 1
        STATS.last_us = (time.perf_counter() - self._t0) * 1e6


def _abandon_tid(tid: int) -> None:
    """Stop tracing ``tid`` if we still do: interrupt it, wait (briefly) for the stop,
    detach.  Every step may fail harmlessly when it is not our tracee."""
    try:
        _ptrace(PTRACE_INTERRUPT, tid)
    except (OSError, _Gone):
        return
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            r, _ = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            return
        if r:
            break
        time.sleep(0.001)
    try:
        _ptrace(PTRACE_DETACH, tid, 0, 0)
    except (OSError, _Gone):
        pass


# ------------------------------------------------------------ userfaultfd

O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
UFFD_USER_MODE_ONLY = 1


PIDFD_THREAD = 0o200  # O_EXCL: a pidfd of one thread (Linux 6.9+)


def pidfd_open(pid: int, flags: int = 0) -> int:
    try:
        return _syscall(NR_PIDFD_OPEN, pid, flags)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise TargetGone(f"process {pid} does not exist (or has exited)") from None
        raise RuntimeFailure(f"pidfd_open({pid}) failed: {e.strerror}") from None


def inject_userfaultfd(pid: int, flags: int = O_CLOEXEC | O_NONBLOCK) -> int:
    """Create a userfaultfd inside ``pid`` and return our own fd for it.

    The target's copy is taken with ``pidfd_getfd`` while the target is still
    stopped, then closed in the target, so the uffd lives only in udamon (and
    closing it drops every protection).  When the target may not create a
    kernel-fault-handling uffd (``vm.unprivileged_userfaultfd=0`` and no
    CAP_SYS_PTRACE), ``UFFD_USER_MODE_ONLY`` is added.
    """
    pidfd = pidfd_open(pid)
    try:
        with Injector(pid) as inj:
            r = inj.call(NR_USERFAULTFD, flags)
            if r == -errno.EPERM and not flags & UFFD_USER_MODE_ONLY:
                r = inj.call(NR_USERFAULTFD, flags | UFFD_USER_MODE_ONLY)
            if r < 0:
                raise RuntimeFailure(
                    f"userfaultfd() inside process {pid} failed: {os.strerror(-r)}"
                )
            try:
                if inj.tid != pid:
                    # the main thread has exited (zombie leader): its pidfd has no file
                    # table any more, the thread we stopped does (a thread pidfd, 6.9+)
                    os.close(pidfd)
                    pidfd = -1
                    pidfd = pidfd_open(inj.tid, PIDFD_THREAD)
                ours = _syscall(NR_PIDFD_GETFD, pidfd, r, 0)
            except (OSError, RuntimeFailure, TargetGone) as e:
                inj.call(NR_CLOSE, r)
                if not isinstance(e, OSError):
                    raise
                if e.errno == errno.ESRCH:
                    raise TargetGone(f"process {pid} exited during injection") from None
                raise RuntimeFailure(f"pidfd_getfd on process {pid} failed: {e.strerror}") from None
            try:
                rc = inj.call(NR_CLOSE, r)
            except BaseException:
                os.close(ours)
                raise
            if rc < 0:  # pragma: no cover - close of a fd we just created
                os.close(ours)
                raise RuntimeFailure(f"close({r}) inside process {pid} failed: {os.strerror(-rc)}")
            return ours
    finally:
        if pidfd >= 0:
            os.close(pidfd)


# ------------------------------------------------------------ the helper process


def inject_userfaultfd_isolated(pid: int, flags: int = O_CLOEXEC | O_NONBLOCK) -> int:
    """``inject_userfaultfd`` run by a helper process (see the module docstring): a
    SIGKILL of udamon during the injection cannot leave the target broken."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "udamon.targets.inject", str(pid), str(flags),
             str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as e:
        ours.close()
        theirs.close()
        raise RuntimeFailure(f"cannot start the injection helper: {e.strerror}") from None
    theirs.close()
    try:
        msg, fds, _, _ = socket.recv_fds(ours, 4096, 1)
    finally:
        ours.close()
        proc.wait()
    if fds:
        return fds[0]
    if not msg:
        raise RuntimeFailure(f"the injection helper died (exit status {proc.returncode})")
    text = msg[1:].decode(errors="replace")
    raise (TargetGone if msg[:1] == b"G" else RuntimeFailure)(text)


def _helper_main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid, flags, fd = (int(x) for x in argv)
    sock = socket.socket(fileno=fd)
    try:
        ufd = inject_userfaultfd(pid, flags)
    except TargetGone as e:
        msg = b"G" + str(e).encode()
    except RuntimeFailure as e:
        msg = b"R" + str(e).encode()
    except Exception as e:  # noqa: BLE001 - everything goes back as one line
        msg = b"R" + f"injection helper: {type(e).__name__}: {e}".encode()
    else:
        try:
            socket.send_fds(sock, [b"K"], [ufd])
        except OSError:
            pass  # udamon is gone: closing our copy drops the uffd
        return 0
    try:
        sock.send(msg)
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
