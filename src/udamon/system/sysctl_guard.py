"""Change system settings for a monitoring session and always put them back.

:class:`SettingsGuard` writes sysctl / sysfs / debugfs files and restores the
originals

* on an orderly exit (``restore()`` / the context manager),
* on SIGTERM (a handler restores, then raises ``SystemExit``) and SIGINT
  (``KeyboardInterrupt`` unwinds through the context manager),
* when udamon itself dies, SIGKILL included: a watchdog child
  (:mod:`udamon.system.sysctl_watchdog`) holds the read end of a pipe
  whose write end only udamon holds; EOF means udamon is gone and the
  watchdog restores what the state file lists,
* and if even the watchdog died, the next udamon calls :func:`restore_stale`,
  which restores the state files of dead owners.

Every restore is compare-and-restore (see the watchdog module): a setting is
put back only while it still holds what udamon wrote.

The state file (``/run/udamon/settings-<pid>.json``) is written *before* a
setting is changed, so no crash window leaves a change unrecorded.

Concurrent sessions: a session also records the settings and mounts it needs
but found already in place, every set and restore holds an ``flock`` on the
state dir's lock file, and a restore of something another live session still
needs hands the original over to it instead (details in the watchdog module),
so the first session to exit does not turn NUMA balancing off under the
others, and the last one out restores the value from before the first.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

from udamon.errors import RuntimeFailure
from udamon.system import mounts
from udamon.system import sysctl_watchdog as wd

DEFAULT_STATE_DIR = "/run/udamon"
NUMA_BALANCING = "/proc/sys/kernel/numa_balancing"
DEBUGFS = "/sys/kernel/debug"
NUMA_TUNABLES_DIR = f"{DEBUGFS}/sched/numa_balancing"
# generous: a starved machine (busy pinned workloads) can take seconds to start Python
_WATCHDOG_READY_TIMEOUT_S = 30.0


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


class SettingsGuard:
    """Set system settings for the session; put them back whatever happens."""

    def __init__(
        self,
        *,
        state_dir: str = DEFAULT_STATE_DIR,
        watchdog: bool = True,
        handle_signals: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.use_watchdog = watchdog
        self.handle_signals = handle_signals
        self.state_path = os.path.join(state_dir, f"settings-{os.getpid()}.json")
        self._entries: list[dict] = []  # {"path", "original", "value"}, first change of a path
        self._mounts: list[dict] = []
        self._watchdog: subprocess.Popen | None = None
        self._old_sigterm: object = None
        self._lock = threading.RLock()
        self._flock: contextlib.ExitStack | None = None  # the state-dir flock, when held
        self._flock_depth = 0
        self._active = False
        self.log: list[str] = []  # one line per restore action

    # -- public API -------------------------------------------------------

    @property
    def changed(self) -> dict[str, str]:
        """Path -> original value of every setting changed so far."""
        return {e["path"]: e["original"] for e in self._entries if e["original"] is not None}

    def set(self, path: str, value: str) -> None:
        """Write ``value`` to ``path``; RuntimeFailure with the reason if not possible."""
        ok, why = self.try_set(path, value)
        if not ok:
            raise RuntimeFailure(why)

    def try_set(self, path: str, value: str) -> tuple[bool, str]:
        """Like :meth:`set`, but returns ``(False, reason)`` instead of raising.

        A value that is already there is recorded as needed (original null), so
        that another session's restore does not take it away from us.
        """
        value = str(value)
        with self._lock:
            try:
                wd.read_value(path)
            except OSError as e:
                return False, f"cannot read {path}: {_reason(e)}"
            self._arm()
            with self._locked():
                try:
                    current = wd.read_value(path)
                except OSError as e:
                    return False, f"cannot read {path}: {_reason(e)}"
                same = wd.norm(current) == wd.norm(value)
                entry = next((e for e in self._entries if e["path"] == path), None)
                if entry is None:
                    entry = {"path": path, "original": None if same else current, "value": value}
                    self._entries.append(entry)
                else:
                    if entry["original"] is None and not same:
                        entry["original"] = current
                    entry["value"] = value
                self._save()  # recorded before the write: no unrecorded change on a crash
                if same:
                    return True, f"{path} already {wd.norm(value)}"
                try:
                    wd.write_value(path, value)
                except OSError as e:
                    entry["value"] = current  # what is there now
                    return False, f"cannot write {wd.norm(value)} to {path}: {_reason(e)}"
                return True, f"{path}: {wd.norm(current)} -> {wd.norm(value)}"

    def mount(self, fstype: str, target: str) -> bool:
        """Mount ``fstype`` on ``target`` unless something is mounted there; undone on restore.

        Returns True if this call mounted it.  A mount found in place is recorded
        as needed, so another session's restore does not unmount it under us.
        """
        with self._lock:
            self._arm()
            with self._locked():
                if any(m["target"] == target for m in self._mounts):
                    return False
                m = {"target": target, "fstype": fstype, "owned": not mounts.is_mounted(target)}
                self._mounts.append(m)
                self._save()
                if not m["owned"]:
                    return False
                try:
                    mounts.mount(fstype, target)
                except OSError as e:
                    self._mounts.remove(m)
                    self._save()
                    raise RuntimeFailure(
                        f"mount -t {fstype} {target} failed: {_reason(e)}") from None
        return True

    def restore(self) -> list[str]:
        """Put every changed setting back (idempotent); returns what was done."""
        with self._lock:
            if not self._active:
                return []
            try:
                with self._locked():  # re-reads our state file: it may hold handed-off originals
                    out = wd.restore_session(self.state_path, fallback=self._state())
            except RuntimeFailure as e:  # the lock file cannot be opened: restore what we know
                out = [str(e), *wd.restore_state(self._state())]
                with contextlib.suppress(OSError):
                    os.unlink(self.state_path)
            self.log.extend(out)
            self._entries.clear()
            self._mounts.clear()
            self._stop_watchdog()  # after the state file is gone: it exits without acting
            self._unhook_signals()
            self._active = False
            return out

    def __enter__(self) -> SettingsGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.restore()

    # -- internals --------------------------------------------------------

    def _state(self) -> dict:
        return {
            "version": wd.STATE_VERSION,
            "pid": os.getpid(),
            "start_time": wd.proc_start_time(os.getpid()),
            "watchdog_pid": self._watchdog.pid if self._watchdog else None,
            "entries": [dict(e) for e in self._entries],
            "mounts": [dict(m) for m in self._mounts],
        }

    @contextlib.contextmanager
    def _locked(self):
        """Hold the state dir's flock (re-entrant within this guard, e.g. from a signal handler)."""
        with self._lock:
            if self._flock_depth == 0:
                stack = contextlib.ExitStack()
                try:
                    stack.enter_context(wd.state_lock(self.state_dir))
                except OSError as e:
                    raise RuntimeFailure(
                        f"cannot lock {self.state_dir}/{wd.LOCK_NAME}: {_reason(e)}") from None
                self._flock = stack
            self._flock_depth += 1
            try:
                yield
            finally:
                self._flock_depth -= 1
                if self._flock_depth == 0 and self._flock is not None:
                    self._flock.close()
                    self._flock = None

    def _merge_handoffs(self) -> None:
        """Adopt what other sessions handed over to us in our state file (under the flock)."""
        disk = wd.load_state(self.state_path)
        if disk is None:
            return
        for d in disk.get("entries", []):
            if d.get("original") is None:
                continue
            for e in self._entries:
                if e["path"] == d["path"]:
                    e["original"] = d["original"]
        for d in disk.get("mounts", []):
            for m in self._mounts:
                if m["target"] == d["target"] and d.get("owned"):
                    m["owned"] = True

    def _save(self) -> None:
        self._merge_handoffs()
        try:
            wd.save_state(self.state_path, self._state())
        except OSError as e:
            raise RuntimeFailure(
                f"cannot write the settings state file {self.state_path}: {_reason(e)}"
            ) from None

    def _arm(self) -> None:
        """Before the first change: state dir, watchdog, signal handlers."""
        if self._active:
            return
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise RuntimeFailure(f"cannot create {self.state_dir}: {_reason(e)}") from None
        self._active = True
        try:
            self._save()
            if self.use_watchdog:
                self._start_watchdog()
                self._save()
            self._hook_signals()
        except BaseException:
            self._active = False
            self._stop_watchdog()
            with contextlib.suppress(OSError):
                os.unlink(self.state_path)
            raise

    def _start_watchdog(self) -> None:
        script = Path(wd.__file__).resolve()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    str(script),
                    "--state",
                    self.state_path,
                    "--parent",
                    str(os.getpid()),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,  # terminal signals to our group do not reach it
            )
        except OSError as e:
            raise RuntimeFailure(f"cannot start the settings watchdog: {_reason(e)}") from None
        assert proc.stdout is not None
        r, _, _ = select.select([proc.stdout], [], [], _WATCHDOG_READY_TIMEOUT_S)
        line = proc.stdout.readline() if r else b""
        if line.strip() != b"ready":
            proc.kill()
            proc.wait()
            raise RuntimeFailure("the settings watchdog did not start; no setting was changed")
        proc.stdout.close()
        self._watchdog = proc

    def _stop_watchdog(self) -> None:
        proc, self._watchdog = self._watchdog, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"exit\n")
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _hook_signals(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the application handles SIGTERM; the watchdog still covers us

        def on_sigterm(signum: int, frame: object) -> None:
            self.restore()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)
        self._old_sigterm = signal.SIG_DFL

    def _unhook_signals(self) -> None:
        if self._old_sigterm is None:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)  # type: ignore[arg-type]
            self._old_sigterm = None


# ---------------------------------------------------------------- stale sessions


def restore_stale(state_dir: str = DEFAULT_STATE_DIR) -> list[str]:
    """Restore the settings of sessions whose owner died (and whose watchdog failed).

    Returns one line per action; state files of live owners are left alone, and
    what a live session still needs is handed off to it rather than restored.
    """
    out: list[str] = []
    if not os.path.isdir(state_dir):
        return out
    try:
        with wd.state_lock(state_dir):
            out.extend(wd.remove_stale_tmp(state_dir))
            for name in sorted(os.listdir(state_dir)):
                if not (name.startswith("settings-") and name.endswith(".json")):
                    continue
                path = os.path.join(state_dir, name)
                state = wd.load_state(path)
                if state is None or wd.owner_alive(state):
                    continue
                out.extend(f"stale session {state.get('pid')}: {line}"
                           for line in wd.restore_session(path))
    except OSError as e:
        raise RuntimeFailure(
            f"cannot restore stale sessions in {state_dir}: {_reason(e)}") from None
    return out


# ---------------------------------------------------------------- NUMA balancing


SCAN_PERIOD_MS_RANGE = (10, 3_600_000)
SCAN_SIZE_MB_RANGE = (1, 1 << 20)


def numa_balancing_settings(sample_us: int, *, scan_period_ms: int | None = None,
                            scan_size_mb: int | None = None) -> dict[str, str]:
    """What the hint primitive sets for a sampling interval of ``sample_us``.

    * ``kernel.numa_balancing``: bit 0 (NUMA_BALANCING_NORMAL) set, keeping any
      other mode bits (e.g. memory tiering) that are already on.
    * debugfs ``sched/numa_balancing/`` scan tunables: the kernel stretches a
      task's scan period toward ``scan_period_max_ms`` (60 s) when every hint
      fault is local, which on one node means always (FACTS.md: seconds-long
      gaps).  Pin ``scan_period_max_ms`` to ``scan_period_min_ms`` so the
      scanner keeps its pace; the period is ~100 sampling intervals (DAMON's
      default 5 ms sample -> 500 ms), clamped to [100, 1000] ms, a new task is
      scanned after one period, and ``scan_size_mb`` keeps the default 256.
      ``scan_period_ms`` / ``scan_size_mb`` (``--hint-scan-period`` /
      ``--hint-scan-size``) override the derived values.  These files are
      often not writable (lockdown, sandboxes): apply them with ``try_set``.
    """
    for name, v, (lo, hi) in (("scan_period_ms", scan_period_ms, SCAN_PERIOD_MS_RANGE),
                              ("scan_size_mb", scan_size_mb, SCAN_SIZE_MB_RANGE)):
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"{name} must be within {lo}..{hi}, got {v}")
    try:
        current = int(wd.read_value(NUMA_BALANCING).strip() or "0")
    except (OSError, ValueError):
        current = 0
    period = scan_period_ms or max(100, min(1000, round(sample_us * 100 / 1000)))
    return {
        NUMA_BALANCING: str(current | 1),
        f"{NUMA_TUNABLES_DIR}/scan_period_min_ms": str(period),
        f"{NUMA_TUNABLES_DIR}/scan_period_max_ms": str(period),
        f"{NUMA_TUNABLES_DIR}/scan_delay_ms": str(period),
        f"{NUMA_TUNABLES_DIR}/scan_size_mb": str(scan_size_mb or 256),
    }


def apply_numa_balancing(guard: SettingsGuard, sample_us: int, *,
                         scan_period_ms: int | None = None,
                         scan_size_mb: int | None = None) -> list[str]:
    """Turn NUMA balancing on through ``guard`` (required) and tune the scanner (best effort).

    Mounts debugfs when needed (the guard unmounts it on restore, unless
    another session still needs it).  Returns one-line notes on what could not
    be done, for the record header.
    """
    settings = numa_balancing_settings(sample_us, scan_period_ms=scan_period_ms,
                                       scan_size_mb=scan_size_mb)
    guard.set(NUMA_BALANCING, settings.pop(NUMA_BALANCING))
    notes: list[str] = []
    if os.path.isdir(DEBUGFS) and (mounts.is_mounted(DEBUGFS)
                                   or not os.path.isdir(NUMA_TUNABLES_DIR)):
        try:
            guard.mount("debugfs", DEBUGFS)
        except RuntimeFailure as e:
            notes.append(f"NUMA balancing scan tunables not changed: {e}")
            return notes
    for path, value in settings.items():
        ok, why = guard.try_set(path, value)
        if not ok:
            notes.append(f"NUMA balancing scan tunable not changed: {why}")
    return notes


# ---------------------------------------------------------------- mounts


TRACEFS = "/sys/kernel/tracing"


def tracefs_needs_mount() -> bool:
    """True when the standard tracefs mount point exists but nothing is mounted there."""
    return os.path.isdir(TRACEFS) and not mounts.is_mounted(TRACEFS) and not os.path.exists(
        os.path.join(TRACEFS, "events"))


def apply_tracefs(guard: SettingsGuard) -> list[str]:
    """Mount tracefs through ``guard`` when needed, so that it is unmounted again on
    every exit path (the watchdog covers SIGKILL); a tracefs already mounted
    there is recorded as needed.  Returns notes for the record."""
    if not (tracefs_needs_mount() or mounts.is_mounted(TRACEFS)):
        return []
    try:
        guard.mount("tracefs", TRACEFS)
    except RuntimeFailure as e:
        return [f"tracefs not mounted by the settings guard: {e}"]
    return []
