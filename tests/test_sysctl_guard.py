"""SettingsGuard: real sysctl changes, restored on every exit path (root only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from udamon.errors import RuntimeFailure
from udamon.system import sysctl_guard as sg
from udamon.system.mounts import is_mounted
from udamon.system.sysctl_guard import (
    NUMA_BALANCING,
    SettingsGuard,
    apply_numa_balancing,
    numa_balancing_settings,
    restore_stale,
)

SRC = str(Path(sg.__file__).resolve().parents[2])
STAT_INTERVAL = "/proc/sys/vm/stat_interval"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing sysctls needs root")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@pytest.fixture
def numa_original():
    """Whatever a test does, kernel.numa_balancing ends as it was."""
    orig = _read(NUMA_BALANCING)
    try:
        yield orig
    finally:
        if _read(NUMA_BALANCING) != orig:
            _write(NUMA_BALANCING, orig)


@pytest.fixture
def stat_interval_original():
    orig = _read(STAT_INTERVAL)
    try:
        yield orig
    finally:
        if _read(STAT_INTERVAL) != orig:
            _write(STAT_INTERVAL, orig)


def _flipped(v: str) -> str:
    return "0" if int(v) & 1 else "1"


def _poll(pred, timeout=3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_set_and_restore(numa_original, tmp_path):
    new = _flipped(numa_original)
    g = SettingsGuard(state_dir=str(tmp_path))
    g.set(NUMA_BALANCING, new)
    assert _read(NUMA_BALANCING) == new
    assert g.changed == {NUMA_BALANCING: numa_original + "\n"}
    state = json.loads(Path(g.state_path).read_text())
    assert state["pid"] == os.getpid()
    assert state["entries"][0]["path"] == NUMA_BALANCING
    wpid = state["watchdog_pid"]
    assert _pid_alive(wpid)
    # a second change of the same path keeps the first original
    g.set(NUMA_BALANCING, new)
    out = g.restore()
    assert any("restored" in line for line in out)
    assert _read(NUMA_BALANCING) == numa_original
    assert not Path(g.state_path).exists()
    assert _poll(lambda: not _pid_alive(wpid))
    # the watchdog exited without acting, and restore is idempotent
    assert g.restore() == []
    assert _read(NUMA_BALANCING) == numa_original


def test_context_manager_and_noop(numa_original, tmp_path):
    with SettingsGuard(state_dir=str(tmp_path)) as g:
        ok, why = g.try_set(NUMA_BALANCING, numa_original)  # already that value
        assert ok and "already" in why
        assert g.changed == {}
        g.set(NUMA_BALANCING, _flipped(numa_original))
    assert _read(NUMA_BALANCING) == numa_original
    assert list(tmp_path.glob("settings-*")) == []  # the lock file stays


def test_not_permitted(tmp_path):
    g = SettingsGuard(state_dir=str(tmp_path))
    ok, why = g.try_set("/proc/sys/kernel/osrelease", "x")
    assert not ok and "osrelease" in why
    ok, why = g.try_set("/proc/sys/kernel/no_such_setting", "1")
    assert not ok and "no_such_setting" in why
    with pytest.raises(RuntimeFailure, match="osrelease"):
        g.set("/proc/sys/kernel/osrelease", "x")
    g.restore()
    assert list(tmp_path.glob("settings-*")) == []  # the lock file stays


def test_someone_else_changed_it(stat_interval_original, tmp_path):
    orig = int(stat_interval_original)
    g = SettingsGuard(state_dir=str(tmp_path))
    g.set(STAT_INTERVAL, str(orig + 1))
    _write(STAT_INTERVAL, str(orig + 2))  # an admin changes it meanwhile
    out = g.restore()
    assert any("someone else" in line for line in out)
    assert _read(STAT_INTERVAL) == str(orig + 2)  # their change is kept


def test_numa_balancing_settings():
    s = numa_balancing_settings(5000)
    assert int(s[NUMA_BALANCING]) & 1
    tun = sg.NUMA_TUNABLES_DIR
    assert s[f"{tun}/scan_period_max_ms"] == s[f"{tun}/scan_period_min_ms"] == "500"
    assert numa_balancing_settings(10)[f"{tun}/scan_period_min_ms"] == "100"
    assert numa_balancing_settings(10**9)[f"{tun}/scan_period_min_ms"] == "1000"


def test_apply_numa_balancing(numa_original, tmp_path):
    debugfs_before = is_mounted(sg.DEBUGFS)
    g = SettingsGuard(state_dir=str(tmp_path))
    notes = apply_numa_balancing(g, 5000)
    assert int(_read(NUMA_BALANCING)) & 1
    for note in notes:  # tunables that are not writable here are reported, not fatal
        assert "scan" in note
    g.restore()
    assert _read(NUMA_BALANCING) == numa_original
    assert is_mounted(sg.DEBUGFS) == debugfs_before


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from udamon.system.sysctl_guard import SettingsGuard
    state_dir, path, value, watchdog = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    # as in a terminal, even when the test runs in the background (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with SettingsGuard(state_dir=state_dir, watchdog=watchdog == "1") as g:
        g.set(path, value)
        print("set", flush=True)
        time.sleep(60)
    """
)


def _start_child(state_dir: Path, value: str, watchdog: bool = True) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(state_dir),
            NUMA_BALANCING,
            value,
            "1" if watchdog else "0",
        ],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "set", f"child did not set the value (exit {proc.poll()})"
    assert _read(NUMA_BALANCING) == value
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_child_killed_restores(numa_original, tmp_path, sig):
    new = _flipped(numa_original)
    proc = _start_child(tmp_path, new)
    state = json.loads(next(tmp_path.glob("settings-*.json")).read_text())
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=10)
    assert _poll(lambda: _read(NUMA_BALANCING) == numa_original, timeout=3.0), (
        f"{signal.Signals(sig).name}: setting not restored"
    )
    elapsed = time.monotonic() - t0
    assert _poll(lambda: not _pid_alive(state["watchdog_pid"]))
    assert _poll(lambda: list(tmp_path.glob("settings-*.json")) == [])
    assert elapsed < 3.0
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode in (128 + sig, -sig, 1)


def test_restore_stale(numa_original, tmp_path):
    new = _flipped(numa_original)
    proc = _start_child(tmp_path, new, watchdog=False)  # as if the watchdog died too
    proc.kill()
    proc.wait(timeout=10)
    time.sleep(0.2)
    assert _read(NUMA_BALANCING) == new  # nobody restored it
    assert len(list(tmp_path.glob("settings-*.json"))) == 1
    out = restore_stale(str(tmp_path))
    assert any("restored" in line for line in out), out
    assert _read(NUMA_BALANCING) == numa_original
    assert list(tmp_path.glob("settings-*.json")) == []
    assert restore_stale(str(tmp_path)) == []
    assert restore_stale(str(tmp_path / "missing")) == []


def test_restore_stale_keeps_live_owner(stat_interval_original, tmp_path):
    orig = int(stat_interval_original)
    g = SettingsGuard(state_dir=str(tmp_path), watchdog=False)
    g.set(STAT_INTERVAL, str(orig + 1))
    try:
        assert restore_stale(str(tmp_path)) == []
        assert _read(STAT_INTERVAL) == str(orig + 1)
        assert Path(g.state_path).exists()
    finally:
        g.restore()
    assert _read(STAT_INTERVAL) == str(orig)


# ---------------------------------------------------------------- overlapping sessions
# Two sessions need the same setting; the first to exit must not take it away from
# the other, and the last one out restores the value from before the first.  On a
# scratch file (the guard treats any path alike), with each session in its own
# process (a state file is per pid).


def _start_session(state_dir: Path, path: Path, value: str, watchdog: bool = True):
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir), str(path), value,
         "1" if watchdog else "0"],
        stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "set", f"session did not start ({proc.poll()})"
    return proc


def _state_of(state_dir: Path, proc: subprocess.Popen) -> dict:
    return json.loads((state_dir / f"settings-{proc.pid}.json").read_text())


def _end(proc: subprocess.Popen, how: str, state_dir: Path) -> None:
    proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
    proc.wait(timeout=10)
    # the guard (SIGTERM) or the watchdog (SIGKILL) has finished when the file is gone
    assert _poll(lambda: not (state_dir / f"settings-{proc.pid}.json").exists(), 5.0)


@pytest.mark.parametrize("how", ["term", "kill"])
def test_overlapping_sessions_last_one_restores(tmp_path, how):
    state, setting = tmp_path / "state", tmp_path / "setting"
    setting.write_text("0\n")
    a = _start_session(state, setting, "1")
    b = _start_session(state, setting, "1")  # finds 1 already there
    try:
        entry = _state_of(state, b)["entries"][0]
        assert entry["original"] is None and entry["value"] == "1"  # needed, not changed
        _end(a, how, state)
        assert _read(str(setting)) == "1", "the first session out took the setting away"
        assert _state_of(state, b)["entries"][0]["original"] == "0\n"  # handed off
    finally:
        _end(b, "term", state)
    assert _read(str(setting)) == "0"
    assert list(state.glob("settings-*")) == []


def test_overlapping_sessions_restore_stale_hands_off(tmp_path):
    state, setting = tmp_path / "state", tmp_path / "setting"
    setting.write_text("0\n")
    a = _start_session(state, setting, "1", watchdog=False)  # as if its watchdog died too
    b = _start_session(state, setting, "1")
    try:
        a.kill()
        a.wait(timeout=10)
        out = restore_stale(str(state))
        assert any("still needed" in line for line in out), out
        assert _read(str(setting)) == "1"
    finally:
        _end(b, "kill", state)  # b's watchdog restores the handed-off original
    assert _read(str(setting)) == "0"


@pytest.mark.parametrize("first_out", ["a", "b"])
def test_overlapping_sessions_different_values(tmp_path, first_out):
    """A sets 0 -> 1, B then 1 -> 2: whichever exits first, the other keeps its value
    until it exits, and 0 is back at the end."""
    state, setting = tmp_path / "state", tmp_path / "setting"
    setting.write_text("0\n")
    a = _start_session(state, setting, "1")
    b = _start_session(state, setting, "2")
    procs = {"a": a, "b": b}
    second_out = "b" if first_out == "a" else "a"
    try:
        _end(procs[first_out], "term", state)
        assert _read(str(setting)) == {"a": "2", "b": "1"}[first_out]
    finally:
        _end(procs[second_out], "term", state)
    assert _read(str(setting)) == "0"


def test_numa_balancing_settings_overrides():
    tun = sg.NUMA_TUNABLES_DIR
    s = numa_balancing_settings(5000, scan_period_ms=40, scan_size_mb=32)
    for name in ("scan_period_min_ms", "scan_period_max_ms", "scan_delay_ms"):
        assert s[f"{tun}/{name}"] == "40"  # not clamped to the derived 100..1000 ms
    assert s[f"{tun}/scan_size_mb"] == "32"
    s = numa_balancing_settings(5000, scan_size_mb=8)  # period still derived
    assert s[f"{tun}/scan_period_min_ms"] == "500" and s[f"{tun}/scan_size_mb"] == "8"
    for bad in ({"scan_period_ms": 0}, {"scan_period_ms": 5}, {"scan_size_mb": 0}):
        with pytest.raises(ValueError):
            numa_balancing_settings(5000, **bad)


class _FakeGuard:
    """Records what apply_numa_balancing asks for; changes nothing."""

    def __init__(self):
        self.wanted: dict[str, str] = {}

    def set(self, path, value):
        self.wanted[path] = value

    def try_set(self, path, value):
        self.wanted[path] = value
        return False, f"cannot write {value} to {path}: Operation not permitted"

    def mount(self, fstype, target):
        return False


def test_apply_numa_balancing_passes_the_overrides_and_notes_eperm():
    g = _FakeGuard()
    notes = apply_numa_balancing(g, 5000, scan_period_ms=250, scan_size_mb=64)
    tun = sg.NUMA_TUNABLES_DIR
    assert g.wanted[f"{tun}/scan_period_max_ms"] == "250"
    assert g.wanted[f"{tun}/scan_size_mb"] == "64"
    assert len(notes) == 4 and all("not permitted" in n for n in notes)  # noted, not fatal


def test_hint_primitive_gets_the_overrides():
    from udamon.core.attrs import Attrs
    from udamon.primitives import registry

    p = registry.entry("hint").make(Attrs(), scan_period_ms=300, scan_size_mb=16)
    assert (p.scan_period_ms, p.scan_size_mb) == (300, 16)
    p = registry.entry("hint").make(Attrs())
    assert (p.scan_period_ms, p.scan_size_mb) == (None, None)
