"""One kdamond of udamon's own through the kernel's DAMON sysfs ABI, and who else holds DAMON.

The ABI is Documentation/ABI/testing/sysfs-kernel-mm-damon (Linux 7.3).  Rules the
kernel imposes, and what udamon does about each:

* ``kdamonds/nr_kdamonds`` cannot change while any sysfs kdamond runs (EBUSY), and
  writing it removes and re-creates *every* kdamond directory, which wipes the
  set-up of idle kdamonds.  So udamon adds its kdamond only when none is running and
  none is set up: it never stops, changes or commands a kdamond it did not start.  To
  say who holds DAMON it reads only their ``state`` and ``pid`` files (and the
  thread's name in /proc), never their configuration or results.
* An *exclusive* kdamond (the DAMON_STAT, DAMON_RECLAIM and DAMON_LRU_SORT modules:
  ``damon_start(..., true)`` in mm/damon/core.c) makes every other ``damon_start()``
  fail with EBUSY while it runs; its ``/sys/module/<m>/parameters/enabled`` says Y.
* Features are detected by the files the kernel creates, never by its version:
  probes (``monitoring_attrs/probes/nr_probes``, Linux 7.2), probe weights
  (``probes/<P>/weight``, 7.3), the intervals goal (``intervals/intervals_goal``),
  the probe filter types a kernel takes (it refuses others with EINVAL), how many
  probes it takes (``nr_probes`` beyond its maximum is EINVAL), and the operations
  sets (``avail_operations``).

Teardown: the two writes that make the kdamond exist and run (``nr_kdamonds`` N ->
N+1, ``state`` off -> on) go through the settings guard, so they are undone in
reverse order (``state`` -> off, which returns once the kdamond thread has exited,
then ``nr_kdamonds`` -> N) on every exit path: ``stop()``, SIGTERM, and udamon's
death by SIGKILL (the guard's watchdog process, which restores only what still holds
udamon's value).  Everything else udamon writes lives inside its own kdamond
directory, which the kernel removes with the ``nr_kdamonds`` write.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from udamon.errors import RuntimeFailure, UsageError
from udamon.system import sysctl_watchdog as wd
from udamon.system.sysctl_guard import DEFAULT_STATE_DIR, SettingsGuard

if TYPE_CHECKING:  # the layers above: their types, not their code
    from udamon.core.attrs import Attrs
    from udamon.probes.filters import Filter

ADMIN = "/sys/kernel/mm/damon/admin"
MODULES = "/sys/module"
# the DAMON modules that start an exclusive kdamond, and their names in the kernel docs
EXCLUSIVE_MODULES = {"damon_stat": "DAMON_STAT", "damon_reclaim": "DAMON_RECLAIM",
                     "damon_lru_sort": "DAMON_LRU_SORT"}
# probe filter types of the 7.2/7.3 ABI (mm/damon/sysfs.c damon_sysfs_filter_type_names)
KERNEL_FILTER_TYPES = ("anon", "memcg")
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _why(e: OSError) -> str:
    return e.strerror or str(e)


# ------------------------------------------------------------------ who holds DAMON


def _owner_sessions(state_dir: str) -> dict[str, int]:
    """kdamond state file -> pid of the live udamon session whose guard turned it on."""
    out: dict[str, int] = {}
    try:
        names = os.listdir(state_dir)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("settings-") and name.endswith(".json")):
            continue
        st = wd.load_state(os.path.join(state_dir, name))
        if st is None or not wd.owner_alive(st):
            continue
        for e in st.get("entries", []):
            p = str(e.get("path", ""))
            if p.endswith("/state") and "/kdamonds/" in p and e.get("value") == "on":
                out[os.path.realpath(p)] = int(st.get("pid", -1))
    return out


def _comm(pid: int) -> str:
    try:
        return _read(f"/proc/{pid}/comm")
    except OSError:
        return "?"


def exclusive_modules(modules: str = MODULES) -> list[str]:
    """One phrase per DAMON module that runs an exclusive kdamond now."""
    out = []
    for mod, title in EXCLUSIVE_MODULES.items():
        d = os.path.join(modules, mod, "parameters")
        try:
            enabled = _read(os.path.join(d, "enabled"))
        except OSError:
            continue
        if enabled not in ("Y", "y", "1"):
            continue
        try:
            pid = int(_read(os.path.join(d, "kdamond_pid")))
        except (OSError, ValueError):
            pid = -1
        what = f"{title} ({mod}.enabled=Y"
        what += f", kdamond pid {pid} {_comm(pid)})" if pid > 0 else ")"
        out.append(what)
    return out


def busy_reason(root: str = ADMIN, *, modules: str = MODULES,
                state_dir: str = DEFAULT_STATE_DIR) -> str | None:
    """Why udamon cannot have a kdamond of its own now, in one line (None: it can)."""
    kd = os.path.join(root, "kdamonds")
    nr_file = os.path.join(kd, "nr_kdamonds")
    if not os.path.exists(nr_file):
        return (f"this kernel has no DAMON sysfs interface ({nr_file} is missing: "
                "CONFIG_DAMON_SYSFS)")
    try:
        nr = int(_read(nr_file))
    except (OSError, ValueError) as e:
        return f"cannot read {nr_file}: {e}"
    owners = _owner_sessions(state_dir)
    running = []
    for i in range(nr):
        try:
            state = _read(os.path.join(kd, str(i), "state"))
        except OSError:
            continue
        if state != "on":
            continue
        try:
            pid = int(_read(os.path.join(kd, str(i), "pid")))
        except (OSError, ValueError):
            pid = -1
        who = owners.get(os.path.realpath(os.path.join(kd, str(i), "state")))
        desc = f"kdamond {i} (pid {pid} {_comm(pid)}"
        desc += f", started by udamon pid {who})" if who else ", not started by udamon)"
        running.append(desc)
    excl = exclusive_modules(modules)
    if running:
        return (f"the kernel's DAMON is busy: {', '.join(running)} is running"
                + (f" and {', '.join(excl)} holds DAMON exclusively" if excl else "")
                + "; udamon does not stop, change or read a kdamond it did not start, and "
                "the kernel refuses to add one while any runs (nr_kdamonds: EBUSY)")
    if excl:
        return (f"the kernel's DAMON is busy: {', '.join(excl)} runs an exclusive kdamond, "
                "and while it runs the kernel refuses every other kdamond (damon_start: "
                "EBUSY); udamon does not stop what it did not start (turn it off with "
                "'echo N > /sys/module/<module>/parameters/enabled' if it is not needed, or "
                "boot with <module>.enabled=N)")
    if nr:
        return (f"{nr} idle kdamond(s) are set up in {kd}; adding one would make the kernel "
                "re-create every kdamond directory and wipe their set-up, and udamon does not "
                f"change a kdamond it did not start ('echo 0 > {nr_file}' if they are not "
                "needed)")
    return None


def kernel_available(root: str = ADMIN, *, state_dir: str = DEFAULT_STATE_DIR,
                     check_root: bool = True) -> tuple[bool, str]:
    """(ok, one-line reason when not) for the kernel primitive."""
    if check_root and os.geteuid() != 0:
        return False, "the kernel primitive needs root (DAMON's sysfs interface)"
    why = busy_reason(root, state_dir=state_dir)
    return (why is None), (why or "")


# ------------------------------------------------------------------ what to set up


@dataclass(frozen=True)
class KernelProbe:
    """A probe the kernel counts: its filters (types anon, memcg) and its 7.3 weight."""

    name: str
    filters: tuple[Filter, ...]
    weight: int = 0


@dataclass
class KdamondSpec:
    ops: str  # "vaddr" or "paddr"
    attrs: Attrs
    # per target: the pid (vaddr) or None (paddr), and its initial regions ([] for vaddr:
    # the kernel derives them from the mappings, and re-derives them every update_us)
    targets: list[tuple[int | None, list[tuple[int, int]]]]
    probes: list[KernelProbe] = field(default_factory=list)
    calibrate: bool = False  # add a probe without filters: every sample hits it


def check_probe_filters(probes: Sequence[KernelProbe]) -> None:
    """UsageError when a probe uses a filter the kernel's DAMON cannot evaluate."""
    for p in probes:
        for f in p.filters:
            if f.type not in KERNEL_FILTER_TYPES:
                raise UsageError(
                    f"probe {p.name!r}: the kernel's DAMON cannot tell {f.type!r} (its probe "
                    f"filters are {', '.join(KERNEL_FILTER_TYPES)}; per-CPU, thread, read and "
                    "write sample filters are not upstream): use a primitive that reports "
                    "who and how (hint, rwp, wp) for that probe")
        if p.weight < 0 or p.weight > U32_MAX:
            raise UsageError(f"probe {p.name!r}: weight must be within 0..{U32_MAX}")


class Kdamond:
    """udamon's own kdamond: configured from a spec, started and always torn down."""

    def __init__(self, spec: KdamondSpec, guard: SettingsGuard, *, root: str = ADMIN,
                 modules: str = MODULES):
        self.spec = spec
        self.guard = guard
        self.root = root
        self.modules = modules
        self.idx: int | None = None
        self.pid = -1  # the kdamond thread, once on
        self.started_ns = 0
        self.notes: list[str] = []
        self.nr_probes = 0  # probes written (the spec's, plus the calibration probe)

    # -- paths ----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        assert self.idx is not None
        return os.path.join(self.root, "kdamonds", str(self.idx), *parts)

    def ctx(self, *parts: str) -> str:
        return self.path("contexts", "0", *parts)

    def _w(self, path: str, value: object) -> None:
        try:
            wd.write_value(path, f"{value}\n")
        except OSError as e:
            raise RuntimeFailure(self._refused(path, value, e)) from None

    def _refused(self, path: str, value: object, e: OSError) -> str:
        rel = os.path.relpath(path, self.root)
        return f"the kernel refused {value!r} for {rel}: {_why(e)}"

    # -- start ------------------------------------------------------------------
    def start(self) -> None:
        """Add the kdamond, configure it, turn it on.  RuntimeFailure (one line) when the
        kernel refuses; whatever was set up is torn down by the caller's guard.restore()."""
        why = busy_reason(self.root, modules=self.modules, state_dir=self.guard.state_dir)
        if why is not None:
            raise RuntimeFailure(why)
        nr_file = os.path.join(self.root, "kdamonds", "nr_kdamonds")
        nr = int(_read(nr_file))
        ok, msg = self.guard.try_set(nr_file, str(nr + 1))
        if not ok:
            raise RuntimeFailure(f"cannot add a kdamond: {msg}")
        self.idx = nr
        self._configure()
        t0 = time.monotonic_ns()
        ok, msg = self.guard.try_set(self.path("state"), "on")
        if not ok:
            raise RuntimeFailure(self._why_not_on(msg))
        self.started_ns = t0
        try:
            self.pid = int(_read(self.path("pid")))
        except (OSError, ValueError):
            self.pid = -1

    def _why_not_on(self, msg: str) -> str:
        if "busy" in msg.lower():
            excl = exclusive_modules(self.modules)
            if excl:
                return (f"the kernel refused to start udamon's kdamond (EBUSY): {', '.join(excl)} "
                        "holds DAMON exclusively; udamon does not stop what it did not start")
            return ("the kernel refused to start udamon's kdamond (EBUSY): another kdamond "
                    "started meanwhile")
        if "invalid" in msg.lower():
            s = self.spec
            hint = []
            if s.ops == "vaddr":
                hint.append("a target process exited")
            if any(f.type == "memcg" for p in s.probes for f in p.filters):
                hint.append("a memcg path is not an online memory cgroup")
            if any(p.weight for p in s.probes):
                hint.append("probe weights times the samples per aggregation overflow 32 bits")
            hint.append("the intervals goal's sampling-interval bounds exclude the sampling "
                        "interval" if s.attrs.intervals_goal.enabled else
                        "the monitoring attributes")
            return (f"the kernel refused udamon's kdamond configuration (EINVAL on 'on'): "
                    f"check that not {' or '.join(hint)}")
        return f"cannot start udamon's kdamond: {msg}"

    def _configure(self) -> None:
        s, a = self.spec, self.spec.attrs
        self._w(self.path("contexts", "nr_contexts"), 1)
        try:
            ops = _read(self.ctx("avail_operations")).split()
        except OSError:
            ops = [s.ops]
        if s.ops not in ops:
            raise RuntimeFailure(f"this kernel's DAMON has no {s.ops} operations (it has: "
                                 f"{' '.join(ops) or 'none'}; CONFIG_DAMON_{s.ops.upper()})")
        self._w(self.ctx("operations"), s.ops)
        iv = ("monitoring_attrs", "intervals")
        self._w(self.ctx(*iv, "sample_us"), a.sample_us)
        self._w(self.ctx(*iv, "aggr_us"), a.aggr_us)
        self._w(self.ctx(*iv, "update_us"), a.update_us)
        goal = a.intervals_goal
        gdir = self.ctx(*iv, "intervals_goal")
        if goal.enabled:
            if not os.path.isdir(gdir):
                raise RuntimeFailure("this kernel's DAMON has no intervals auto-tuning "
                                     f"({os.path.relpath(gdir, self.root)} is missing): monitor "
                                     "without an intervals goal")
            # aggrs last: the other three are checked against each other at 'on'
            self._w(os.path.join(gdir, "access_bp"), goal.access_bp)
            self._w(os.path.join(gdir, "min_sample_us"), goal.min_sample_us)
            self._w(os.path.join(gdir, "max_sample_us"), goal.max_sample_us)
            self._w(os.path.join(gdir, "aggrs"), goal.aggrs)
        elif os.path.isdir(gdir):
            self._w(os.path.join(gdir, "aggrs"), 0)
        nr = ("monitoring_attrs", "nr_regions")
        self._w(self.ctx(*nr, "max"), a.max_nr_regions)  # max first: min may not exceed it
        self._w(self.ctx(*nr, "min"), a.min_nr_regions)
        self._set_probes()
        self._w(self.ctx("targets", "nr_targets"), len(s.targets))
        for i, (pid, regions) in enumerate(s.targets):
            t = ("targets", str(i))
            if s.ops == "vaddr":
                assert pid is not None
                self._w(self.ctx(*t, "pid_target"), pid)
            self._w(self.ctx(*t, "regions", "nr_regions"), len(regions))
            for j, (lo, hi) in enumerate(sorted(regions)):
                self._w(self.ctx(*t, "regions", str(j), "start"), int(lo))
                self._w(self.ctx(*t, "regions", str(j), "end"), int(hi))
        # one 'stat' scheme that matches every region: its tried_regions are the
        # snapshot reader's fallback (an access pattern's maxima default to 0, which
        # matches nothing, so they are set explicitly)
        self._w(self.ctx("schemes", "nr_schemes"), 1)
        sch = ("schemes", "0")
        self._w(self.ctx(*sch, "action"), "stat")
        for what, hi in (("sz", U64_MAX), ("nr_accesses", U32_MAX), ("age", U32_MAX)):
            self._w(self.ctx(*sch, "access_pattern", what, "max"), hi)
            self._w(self.ctx(*sch, "access_pattern", what, "min"), 0)

    def _set_probes(self) -> None:
        s = self.spec
        pdir = self.ctx("monitoring_attrs", "probes")
        nr_file = os.path.join(pdir, "nr_probes")
        n = len(s.probes) + (1 if s.calibrate else 0)
        if not s.probes:
            self.nr_probes = 0
            return
        if not os.path.exists(nr_file):
            raise RuntimeFailure(
                "this kernel's DAMON has no probes (monitoring_attrs/probes/nr_probes is "
                "missing; Linux 7.2 added them): monitor without probes")
        try:
            wd.write_value(nr_file, f"{n}\n")
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise RuntimeFailure(self._refused(nr_file, n, e)) from None
            most = self._max_probes(nr_file, n)
            extra = " (one more is used to check that the operations count probes)" \
                if s.calibrate else ""
            raise UsageError(f"this kernel's DAMON takes at most {most} probes, "
                             f"{len(s.probes)} given{extra}") from None
        self.nr_probes = n
        for i, p in enumerate(s.probes):
            self._write_probe(os.path.join(pdir, str(i)), p)
        if s.calibrate:  # no filters: every sample hits it
            self._w(os.path.join(pdir, str(len(s.probes)), "filters", "nr_filters"), 0)

    def _max_probes(self, nr_file: str, tried: int) -> int:
        for k in range(tried - 1, 0, -1):
            try:
                wd.write_value(nr_file, f"{k}\n")
                wd.write_value(nr_file, "0\n")
                return k
            except OSError:
                continue
        return 0

    def _write_probe(self, d: str, p: KernelProbe) -> None:
        wfile = os.path.join(d, "weight")
        if p.weight:
            if not os.path.exists(wfile):
                raise RuntimeFailure(
                    f"probe {p.name!r}: this kernel's DAMON probes have no weight "
                    "(probes/<P>/weight is missing; Linux 7.3 added attributes-only "
                    "monitoring): monitor without probe weights")
            self._w(wfile, p.weight)
        elif os.path.exists(wfile):
            self._w(wfile, 0)
        fdir = os.path.join(d, "filters")
        self._w(os.path.join(fdir, "nr_filters"), len(p.filters))
        for j, f in enumerate(p.filters):
            fd = os.path.join(fdir, str(j))
            try:
                wd.write_value(os.path.join(fd, "type"), f"{f.type}\n")
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise RuntimeFailure(f"probe {p.name!r}: this kernel's DAMON has no "
                                         f"{f.type!r} probe filter") from None
                raise RuntimeFailure(self._refused(os.path.join(fd, "type"), f.type, e)
                                     ) from None
            if f.type == "memcg":
                self._w(os.path.join(fd, "path"), f.value or "")
            self._w(os.path.join(fd, "matching"), "Y" if f.matching else "N")
            self._w(os.path.join(fd, "allow"), "Y" if f.allow else "N")

    # -- while it runs ------------------------------------------------------------
    @property
    def running(self) -> bool:
        if self.idx is None:
            return False
        try:
            return _read(self.path("state")) == "on"
        except OSError:
            return False

    def tried_regions(self) -> tuple[int, list[tuple[int, int, int, int, tuple[int, ...]]]]:
        """Ask the kernel for the regions of its next aggregation (the stat scheme's
        tried regions; the write returns once the kdamond has applied the scheme, at the
        end of an aggregation) and read them: (the time the write returned,
        [(start, end, nr_accesses, age, probe hits), ...] sorted)."""
        self._w(self.path("state"), "update_schemes_tried_regions")
        t = time.monotonic_ns()
        d = self.ctx("schemes", "0", "tried_regions")
        out = []
        for name in os.listdir(d):
            if not name.isdigit():
                continue
            rd = os.path.join(d, name)
            try:
                hits = tuple(int(_read(os.path.join(rd, "probes", str(i), "hits")))
                             for i in range(self.nr_probes))
                out.append((int(_read(os.path.join(rd, "start"))),
                            int(_read(os.path.join(rd, "end"))),
                            int(_read(os.path.join(rd, "nr_accesses"))),
                            int(_read(os.path.join(rd, "age"))), hits))
            except (OSError, ValueError):
                continue  # removed under us: the next snapshot has it
        out.sort()
        return t, out

    def describe(self) -> dict:
        """For the record header: which kdamond, what it runs."""
        return {"kdamond": self.idx, "kdamond_pid": self.pid, "ops": self.spec.ops,
                "probes": [{"name": p.name, "weight": p.weight} for p in self.spec.probes]}


def system_ram(iomem: str = "/proc/iomem") -> list[tuple[int, int]]:
    """The top-level "System RAM" ranges of /proc/iomem ([start, end) bytes; root only:
    others see zeros)."""
    out = []
    try:
        with open(iomem) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RuntimeFailure(f"cannot read {iomem}: {_why(e)}") from None
    for ln in lines:
        if ln.startswith(" ") or ":" not in ln:
            continue
        span, _, name = ln.partition(" : ")
        if name.strip() != "System RAM":
            continue
        lo, _, hi = span.partition("-")
        s, e = int(lo, 16), int(hi, 16) + 1
        if e > s:
            out.append((s, e))
    if out and all(s == 0 for s, _ in out) and all(e <= 1 for _, e in out):
        raise RuntimeFailure(f"{iomem} shows no addresses (root needed)")
    return out
