"""A constructed DAMON sysfs tree that acts like the kernel's on writes (for host tests).

The kernel's sysfs creates directories when ``nr_*`` files are written, refuses
``nr_kdamonds`` while a kdamond is on (EBUSY), refuses unknown probe filter types
and more probes than DAMON_MAX_PROBES (EINVAL), and turns ``state`` on and off.
``FakeKernel.install(monkeypatch)`` routes udamon's sysfs writes
(``sysctl_watchdog.write_value``) under the fake root to it; writes elsewhere are
real.  What the kernel really does is tested in the Linux 7.3 guest.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from udamon.system import sysctl_watchdog as wd

_real_write = wd.write_value


class FakeKernel:
    def __init__(self, root: Path, *, max_probes: int = 4, weight: bool = True,
                 probes: bool = True, ops: str = "vaddr fvaddr paddr",
                 on_errno: int | None = None, kdamond_pid: int = 4242):
        self.root = root  # plays /sys/kernel/mm/damon/admin
        self.max_probes, self.weight, self.probes, self.ops = max_probes, weight, probes, ops
        self.on_errno = on_errno
        self.kdamond_pid = kdamond_pid
        self.log: list[tuple[str, str]] = []  # (path relative to root, value) in order
        kd = root / "kdamonds"
        kd.mkdir(parents=True, exist_ok=True)
        (kd / "nr_kdamonds").write_text("0\n")

    def install(self, monkeypatch) -> FakeKernel:
        def write(path: str, value: str) -> None:
            if os.path.abspath(path).startswith(str(self.root) + os.sep):
                self.write(path, value)
            else:
                _real_write(path, value)

        monkeypatch.setattr(wd, "write_value", write)
        return self

    # -- the kernel's side -------------------------------------------------------
    def write(self, path: str, value: str) -> None:
        p = Path(path)
        v = str(value).strip()
        self.log.append((str(p.relative_to(self.root)), v))
        name = p.name
        if name == "nr_kdamonds":
            self._nr_kdamonds(p.parent, int(v))
        elif name == "state":
            self._state(p.parent, v)
            return
        elif name == "nr_contexts":
            self._dirs(p.parent, int(v), self._context)
        elif name == "nr_probes":
            if int(v) > self.max_probes:
                raise OSError(errno.EINVAL, "Invalid argument")
            self._dirs(p.parent, int(v), self._probe)
        elif name == "nr_filters" and p.parent.parent.parent.name == "probes":
            self._dirs(p.parent, int(v), self._filter)
        elif name == "nr_targets":
            self._dirs(p.parent, int(v), self._target)
        elif name == "nr_regions" and p.parent.name == "regions":
            self._dirs(p.parent, int(v), lambda d: self._files(d, start="0", end="0"))
        elif name == "nr_schemes":
            self._dirs(p.parent, int(v), self._scheme)
        elif name == "type" and p.parent.parent.name == "filters":
            if v not in ("anon", "memcg"):
                raise OSError(errno.EINVAL, "Invalid argument")
        if not p.exists() and name not in ("nr_kdamonds",):
            raise OSError(errno.ENOENT, "No such file or directory")
        p.write_text(v + "\n")

    def _nr_kdamonds(self, kd: Path, n: int) -> None:
        for d in kd.iterdir():
            if d.is_dir() and (d / "state").read_text().strip() == "on":
                raise OSError(errno.EBUSY, "Device or resource busy")
        for d in list(kd.iterdir()):
            if d.is_dir():
                shutil.rmtree(d)
        for i in range(n):
            d = kd / str(i)
            (d / "contexts").mkdir(parents=True)
            self._files(d, state="off", pid="-1", refresh_ms="0")
            self._files(d / "contexts", nr_contexts="0")

    def _state(self, d: Path, v: str) -> None:
        if v == "on":
            if self.on_errno is not None:
                raise OSError(self.on_errno, os.strerror(self.on_errno))
            (d / "state").write_text("on\n")
            (d / "pid").write_text(f"{self.kdamond_pid}\n")
        elif v == "off":
            (d / "state").write_text("off\n")
            (d / "pid").write_text("-1\n")
        elif v == "update_schemes_tried_regions":
            ctx = d / "contexts" / "0"
            regs = ctx / "targets" / "0" / "regions"
            tried = ctx / "schemes" / "0" / "tried_regions"
            n = int((regs / "nr_regions").read_text())
            nprobes = int((ctx / "monitoring_attrs" / "probes" / "nr_probes").read_text())
            for i in range(n):
                r = tried / str(i)
                r.mkdir(parents=True, exist_ok=True)
                self._files(r, start=(regs / str(i) / "start").read_text().strip(),
                            end=(regs / str(i) / "end").read_text().strip(),
                            nr_accesses=str(i), age="3")
                for k in range(nprobes):
                    self._files(r / "probes" / str(k), hits=str(i + k))
        else:
            raise OSError(errno.EINVAL, "Invalid argument")

    @staticmethod
    def _files(d: Path, **files: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        for k, v in files.items():
            (d / k).write_text(v + "\n")

    def _dirs(self, parent: Path, n: int, make) -> None:
        for d in list(parent.iterdir()):
            if d.is_dir() and d.name.isdigit():
                shutil.rmtree(d)
        for i in range(n):
            make(parent / str(i))

    def _context(self, c: Path) -> None:
        self._files(c, avail_operations=self.ops, operations="vaddr", addr_unit="1")
        iv = c / "monitoring_attrs" / "intervals"
        self._files(iv, sample_us="5000", aggr_us="100000", update_us="1000000")
        self._files(iv / "intervals_goal", access_bp="0", aggrs="0", min_sample_us="0",
                    max_sample_us="0")
        self._files(c / "monitoring_attrs" / "nr_regions", min="10", max="1000")
        if self.probes:
            self._files(c / "monitoring_attrs" / "probes", nr_probes="0")
        self._files(c / "targets", nr_targets="0")
        self._files(c / "schemes", nr_schemes="0")

    def _probe(self, d: Path) -> None:
        if self.weight:
            self._files(d, weight="0")
        self._files(d / "filters", nr_filters="0")

    def _filter(self, d: Path) -> None:
        self._files(d, type="anon", matching="N", allow="N", path="")

    def _target(self, d: Path) -> None:
        self._files(d, pid_target="0", obsolete_target="N")
        self._files(d / "regions", nr_regions="0")

    def _scheme(self, d: Path) -> None:
        self._files(d, action="stat", apply_interval_us="0")
        for w in ("sz", "nr_accesses", "age"):
            self._files(d / "access_pattern" / w, min="0", max="0")
        (d / "tried_regions").mkdir(parents=True, exist_ok=True)

    # -- reading back ------------------------------------------------------------
    def read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()
