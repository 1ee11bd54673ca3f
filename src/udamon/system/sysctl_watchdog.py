"""Watchdog that restores system settings when the udamon process dies.

Started by :class:`udamon.system.sysctl_guard.SettingsGuard` as
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

Several sessions at once (two ``udamon record --primitive hint``): every
session lists in its state file each setting it *needs*, with ``original``
null when it found the value already there, and each mount it needs, with
``owned`` false when it found it mounted.  Everything that reads or writes a
state file or a setting (set, restore by the guard, the watchdog or
``restore_stale``) holds ``flock`` on ``settings.lock`` in the state dir, and
:func:`restore_session` re-reads the owner's file under it.  A setting or
mount that another *live* session still needs is not restored but handed off:
its original goes into that session's entry (mount ownership likewise), so the
last session out restores the value from before the first one came.  The one
exception: when the original is exactly what the other session needs, the
restore is done (it gives that session its value back).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import signal
import sys

STATE_VERSION = 2  # 2: entries may have original null (needed, not changed)
LOCK_NAME = "settings.lock"
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
    if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION):
        return None
    return state


@contextlib.contextmanager
def state_lock(state_dir: str):
    """Exclusive ``flock`` on the state dir's lock file: one restorer or setter at a time."""
    fd = os.open(os.path.join(state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_state(path: str, state: dict) -> None:
    """Write ``path`` atomically through ``PATH.tmpPID`` (PID: the writer).  A writer
    killed between the two leaves the .tmp file: :func:`remove_stale_tmp` takes it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _process_gone(pid: int) -> bool:
    """No such process, or only its zombie: it writes nothing any more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2 :][:1] in (b"Z", b"X")


def remove_stale_tmp(state_dir: str, gone: tuple[int, ...] = ()) -> list[str]:
    """Remove the ``settings-*.json.tmpPID`` files whose writer is gone: a session,
    watchdog or restorer SIGKILLed between writing a state file and renaming it into
    place.  The state file itself is intact (the rename never happened), so nothing
    else is lost.  ``gone``: writers known to be gone (a session being restored for
    because it died may still be exiting).  Call it holding :func:`state_lock`."""
    out = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(state_dir)):
            base, sep, writer = name.rpartition(".tmp")
            if not (sep and base.startswith("settings-") and base.endswith(".json")
                    and writer.isdigit()):
                continue
            w = int(writer)
            if w != os.getpid() and (w in gone or _process_gone(w)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(state_dir, name))
                    out.append(f"removed {name}, left by a process killed while writing it")
    return out


def restore_entry(entry: dict) -> str:
    """Compare-and-restore one setting; returns a one-line outcome."""
    path, original, value = entry["path"], entry.get("original"), entry["value"]
    if original is None:
        return f"{path}: not changed by this session"
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
    """Restore every changed entry (latest first), then undo the mounts udamon made."""
    out = [restore_entry(e) for e in reversed(state.get("entries", []))
           if e.get("original") is not None]
    out.extend(umount(m["target"]) for m in reversed(state.get("mounts", []))
               if m.get("owned", True))
    return out


def _live_others(state_path: str) -> list[tuple[str, dict]]:
    """State files of the other sessions in the same dir whose owner is alive."""
    d = os.path.dirname(state_path) or "."
    out = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if (name.startswith("settings-") and name.endswith(".json")
                    and os.path.abspath(p) != os.path.abspath(state_path)):
                st = load_state(p)
                if st is not None and owner_alive(st):
                    out.append((p, st))
    return out


def restore_session(state_path: str, fallback: dict | None = None) -> list[str]:
    """Restore or hand off what one session changed, then remove its state file.

    Call it holding :func:`state_lock`.  ``fallback`` is used when the file is
    missing (the owner's in-memory state).
    """
    state = load_state(state_path) or fallback
    owner = int((state or {}).get("pid") or -1)
    out: list[str] = remove_stale_tmp(os.path.dirname(state_path) or ".",
                                      (owner,) if owner != os.getpid() else ())
    if state is not None:
        others = _live_others(state_path)
        for e in reversed(state.get("entries", [])):
            if e.get("original") is None:
                continue
            taker = next(((p, st, x) for p, st in others for x in st.get("entries", [])
                          if x["path"] == e["path"]), None)
            if taker is None or norm(e["original"]) == norm(taker[2]["value"]):
                out.append(restore_entry(e))
                continue
            p, st, x = taker
            if x.get("original") is None or norm(x["original"]) == norm(e["value"]):
                x["original"] = e["original"]  # the older original, for the last one out
                save_state(p, st)
                out.append(f"{e['path']}: still needed by udamon {st.get('pid')}, which will "
                           f"restore {norm(e['original'])}")
            else:  # that session changed it before us: undo only our layer
                out.append(restore_entry(e))
        for m in reversed(state.get("mounts", [])):
            if not m.get("owned", True):
                continue
            taker = next(((p, st, x) for p, st in others for x in st.get("mounts", [])
                          if x["target"] == m["target"]), None)
            if taker is None:
                out.append(umount(m["target"]))
                continue
            p, st, x = taker
            x["owned"] = True
            save_state(p, st)
            out.append(f"{m['target']}: still needed by udamon {st.get('pid')}, which will "
                       "unmount it")
    with contextlib.suppress(OSError):
        os.unlink(state_path)
    return out


_restoring = False


def _restore_file(state_path: str) -> None:
    global _restoring
    if _restoring:  # EOF and PDEATHSIG both fire: restore once
        return
    _restoring = True
    try:
        with state_lock(os.path.dirname(state_path) or "."):
            lines = restore_session(state_path)
    except OSError as e:
        lines = [f"cannot restore from {state_path}: {e.strerror or e}"]
    for line in lines:
        print(f"udamon watchdog: {line}", file=sys.stderr)


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
