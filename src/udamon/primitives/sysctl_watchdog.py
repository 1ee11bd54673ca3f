"""Watchdog that restores system settings when the udamon process dies.

Started by :class:`udamon.primitives.sysctl_guard.SettingsGuard` as
``python -I sysctl_watchdog.py --state FILE --parent PID`` with its stdin the
read end of a pipe whose write end only the parent holds.  It prints
``ready`` once it is armed, then blocks on stdin:

* a line ``exit`` means the parent restored everything itself: exit quietly;
* EOF without ``exit`` means the parent is gone (exited, crashed, SIGKILL):
  restore what the state file lists and exit.

``PR_SET_PDEATHSIG`` (SIGTERM) is set too, as a second signal; it is only
acted on when the parent really is gone (``getppid()`` changed), since the
kernel also sends it when the parent *thread* that forked us exits.

The restore is compare-and-restore: a setting is written back to its original
only while it still holds the value udamon set, so a change somebody else made
meanwhile is left alone and running the restore twice is harmless.  This
module uses the standard library only (the guard runs it with ``-I``) and its
helpers are shared with the guard.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys

STATE_VERSION = 1
PR_SET_PDEATHSIG = 1


def norm(value: str) -> str:
    """Canonical form of a setting's text ("1\\n" == "1", "4096\\t87380" == "4096 87380")."""
    return " ".join(value.split())


def read_value(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_value(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks (field 22 of /proc/PID/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[19])


def owner_alive(state: dict) -> bool:
    pid = int(state.get("pid", -1))
    if pid <= 0:
        return False
    st = proc_start_time(pid)
    return st is not None and st == state.get("start_time", st)


def load_state(path: str) -> dict | None:
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        return None
    return state


def save_state(path: str, state: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore_entry(entry: dict) -> str:
    """Compare-and-restore one setting; returns a one-line outcome."""
    path, original, value = entry["path"], entry["original"], entry["value"]
    try:
        current = read_value(path)
    except OSError as e:
        return f"{path}: cannot read ({e.strerror}); left alone"
    if norm(current) == norm(original):
        return f"{path}: already {norm(original)}"
    if norm(current) != norm(value):
        return f"{path}: changed by someone else to {norm(current)}; left alone"
    try:
        write_value(path, original)
    except OSError as e:
        return f"{path}: restore to {norm(original)} failed ({e.strerror})"
    return f"{path}: restored {norm(value)} -> {norm(original)}"


def umount(target: str) -> str:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.umount2(target.encode(), 0) != 0:
        e = ctypes.get_errno()
        return f"umount {target} failed ({os.strerror(e)})"
    return f"unmounted {target}"


def restore_state(state: dict) -> list[str]:
    """Restore every entry (latest first), then undo the mounts udamon made."""
    out = [restore_entry(e) for e in reversed(state.get("entries", []))]
    out.extend(umount(m["target"]) for m in reversed(state.get("mounts", [])))
    return out


_restoring = False


def _restore_file(state_path: str) -> None:
    global _restoring
    if _restoring:  # EOF and PDEATHSIG both fire: restore once
        return
    _restoring = True
    state = load_state(state_path)
    if state is not None:
        for line in restore_state(state):
            print(f"udamon watchdog: {line}", file=sys.stderr)
    with contextlib.suppress(OSError):
        os.unlink(state_path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        state_path = args[args.index("--state") + 1]
        parent = int(args[args.index("--parent") + 1])
    except (ValueError, IndexError):
        print("usage: sysctl_watchdog --state FILE --parent PID", file=sys.stderr)
        return 2

    def parent_gone() -> bool:
        return os.getppid() != parent

    def on_signal(signum: int, frame: object) -> None:
        if parent_gone() and not _restoring:
            _restore_file(state_path)
            os._exit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal ^C is for the parent
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent_gone():  # the parent died before PDEATHSIG was armed
        _restore_file(state_path)
        return 0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stdin = sys.stdin.buffer
    while True:
        try:
            line = stdin.readline()
        except InterruptedError:
            continue
        if not line:  # EOF: the parent is gone
            _restore_file(state_path)
            return 0
        if line.strip() == b"exit":
            return 0


if __name__ == "__main__":
    sys.exit(main())
