"""Launch a command to monitor from its start.

The child blocks on a pipe between fork and exec, so the monitor can attach
its tracer to the pid before the program runs its first instruction (the
tracer's events follow the task across exec).  subprocess.Popen cannot do
this: it waits for the exec itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

from udamon.errors import RuntimeFailure, UsageError
from udamon.targets.procmaps import process_name, read_vmas


class Launched:
    def __init__(self, argv: list[str]):
        if not argv:
            raise UsageError("no command given after --")
        path = shutil.which(argv[0])
        if path is None:
            raise UsageError(f"command not found or not executable: {argv[0]}")
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe()
        os.set_inheritable(err_w, False)
        pid = os.fork()
        if pid == 0:  # child: wait for the go, then exec
            try:
                os.close(go_w)
                os.close(err_r)
                os.read(go_r, 1)
                os.close(go_r)
                os.execv(path, argv)
            except OSError as e:
                os.write(err_w, str(e.errno).encode())
            finally:
                os._exit(127)
        os.close(go_r)
        os.close(err_w)
        self.pid = pid
        self.argv = argv
        # the kernel names a task after the file it execs (TASK_COMM_LEN - 1 bytes)
        self.comm = os.path.basename(path).encode()[:15].decode(errors="ignore")
        self._go = go_w
        self._err = err_r
        self.returncode: int | None = None
        self._pre_exec_maps = _maps_key(pid)

    def release(self, wait_exec_s: float = 0.5) -> None:
        """Let the child exec; wait (briefly) until its new image is mapped and it has
        its new name.  The kernel replaces the mm (new maps) and closes close-on-exec
        fds before it sets the name, so either alone can be seen while /proc/PID/comm
        still has the name of the forked udamon."""
        os.write(self._go, b"x")
        os.close(self._go)
        err = os.read(self._err, 16)  # EOF once exec succeeded (close-on-exec)
        os.close(self._err)
        if err:
            self.wait()
            raise RuntimeFailure(f"cannot run {self.argv[0]}: {os.strerror(int(err))}")
        deadline = time.monotonic() + wait_exec_s
        while time.monotonic() < deadline and self.poll() is None:
            if _maps_key(self.pid) != self._pre_exec_maps and process_name(self.pid) == self.comm:
                return
            time.sleep(0.002)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = -1
            except InterruptedError:
                continue
        return self.returncode

    def wait_forwarding_signals(self) -> int:
        """Wait for the command, passing SIGINT/SIGTERM on to it."""
        def fwd(signum, frame):
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

        old = {s: signal.signal(s, fwd) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _maps_key(pid: int):
    try:
        return tuple((v.start, v.end, v.path) for v in read_vmas(pid))
    except Exception:
        return None
