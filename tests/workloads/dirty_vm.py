"""Tiny QEMU VMs with a known dirtying rate inside: the dirty-rate ground truth.

Two kinds of guest, both under TCG, both printing on the serial console the
distinct pages they wrote in each 1 s window -- the truth udamon's estimate and
QEMU's ``calc-dirty-rate`` are compared with:

* ``bare`` (the default): ``tests/workloads/vm_dirtier.c``, a Multiboot image
  QEMU loads with ``-kernel``; no operating system, so the guest's only writes
  to its RAM are the dirtier's (the buffer and a few pages of its own, which it
  counts too);
* ``linux``: the guest tier's kernel (tests/guest/prepare.py: Debian's Linux 7.3
  in ``/var/cache/udamon-guest``) with an initramfs of one file,
  ``tests/workloads/dirtier.c`` built static as ``/init``.  Realistic, but the
  guest kernel itself dirties ~150 pages/s of RAM when idle, which the truth
  the dirtier prints cannot include.

The dirtier writes ``rate`` random pages per second over a ``buffer_mib``
buffer.  The VM's
QMP socket answers ``calc-dirty-rate`` in page-sampling mode (the dirty-bitmap
mode segfaults QEMU 7.2 under TCG).  ``mem-merge=off``: the VMs' RAM is not
offered to KSM, which the KSM tests need to themselves.

Used by tests/test_dirty_vm.py and bench/bench_dirty.py; run them one at a time
(``flock /tmp/udamon-guest.lock``): three TCG VMs keep two CPUs busy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guest"))
from prepare import default_cache  # noqa: E402


class VmUnavailable(RuntimeError):
    """QEMU, the guest kernel or a static C build is missing: the reason."""


def qemu_binary() -> str:
    q = shutil.which("qemu-system-x86_64")
    if q is None:
        raise VmUnavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return q


def guest_kernel() -> Path:
    """The guest tier's kernel; prepared (downloaded) when missing."""
    cache = default_cache()
    k = cache / "vmlinuz"
    if k.is_file():
        return k
    from prepare import prepare

    try:
        prepare(cache)
    except (SystemExit, OSError, subprocess.CalledProcessError) as e:
        raise VmUnavailable(f"the guest kernel could not be prepared: {e}") from None
    if not k.is_file():
        raise VmUnavailable(f"no guest kernel at {k}")
    return k


def bare_kernel() -> Path:
    """The bare-metal dirtier, a 32-bit Multiboot ELF (cached by content)."""
    src = HERE / "vm_dirtier.c"
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise VmUnavailable("no C compiler (gcc) to build the guest")
    flags = ["-m32", "-ffreestanding", "-fno-pic", "-fno-stack-protector",
             "-mgeneral-regs-only", "-nostdlib", "-static", "-O2", "-Wl,-Ttext=0x100000",
             "-Wl,-n", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"]
    digest = hashlib.sha256(src.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"udamon-vmdirtier-{digest}" / "vm_dirtier.elf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    p = subprocess.run([gcc, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if p.returncode != 0:
        raise VmUnavailable(f"cannot build the bare-metal guest: {p.stderr[-300:]}")
    os.replace(tmp, out)
    return out


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
                ino: int = 0) -> bytes:
    nb = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
    out = ("070701" + "".join(f"{v:08X}" for v in fields)).encode() + nb
    out += b"\0" * (-len(out) % 4)
    return out + data + b"\0" * (-len(data) % 4)


def initramfs() -> Path:
    """``/init`` = the static dirtier, and ``/dev/console`` (its output): a newc cpio,
    gzipped, cached by content."""
    src = HERE / "dirtier.c"
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise VmUnavailable("no C compiler (gcc) to build the guest's init")
    digest = hashlib.sha256(src.read_bytes() + b"static-v1").hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"udamon-dirtier-{digest}" / "initramfs.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    binary = out.parent / f"init.{os.getpid()}"
    p = subprocess.run([gcc, "-O2", "-static", "-o", str(binary), str(src)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise VmUnavailable(f"cannot build the static guest init (libc6-dev?): {p.stderr[-300:]}")
    entries = [_cpio_entry(".", 0o40755, ino=1), _cpio_entry("dev", 0o40755, ino=2),
               _cpio_entry("dev/console", 0o20600, rdev=(5, 1), ino=3),
               _cpio_entry("init", 0o100755, binary.read_bytes(), ino=4),
               _cpio_entry("TRAILER!!!", 0)]
    binary.unlink()
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(b"".join(entries)))
    os.replace(tmp, out)
    return out


@dataclass
class VM:
    """One running VM (``start`` boots it and waits for the dirtier)."""

    rate: int
    mem_mib: int = 800
    buffer_mib: int = 128
    seed: int = 1
    kind: str = "bare"  # or "linux"
    check: int = 0  # bare: check the buffer every N windows (0: never)
    tick_ms: int = 20  # linux: the dirtier's pacing
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="udamon-vm-")))
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    _pos: int = 0
    _part: bytes = b""
    lines: list[dict] = field(default_factory=list)  # the dirtier's window lines so far
    checks: list[dict] = field(default_factory=list)  # its buffer checks

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        if self.kind == "bare":
            boot = ["-kernel", str(bare_kernel()), "-append",
                    f"rate={self.rate} mib={self.buffer_mib} seed={self.seed} check={self.check}"]
        else:
            boot = ["-kernel", str(guest_kernel()), "-initrd", str(initramfs()), "-append",
                    f"console=ttyS0 panic=-1 loglevel=3 mitigations=off "
                    f"dirtier_rate={self.rate} dirtier_mib={self.buffer_mib} "
                    f"dirtier_seed={self.seed} dirtier_tick_ms={self.tick_ms}"]
        return [qemu_binary(), "-accel", "tcg,thread=single", "-m", f"{self.mem_mib}M",
                "-smp", "1", "-nodefaults", "-no-user-config", "-machine", "pc,mem-merge=off",
                "-display", "none", "-monitor", "none", "-no-reboot", *boot,
                "-serial", f"file:{self.console}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]

    def start(self) -> VM:
        cmd = self.command()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        return self

    def poll_console(self) -> None:
        try:
            with open(self.console, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        self._pos += len(data)
        parts = (self._part + data).split(b"\n")
        self._part = parts.pop()
        for raw in parts:
            text = raw.decode(errors="replace").strip()
            if not text.startswith("{"):
                continue
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if "addr" in obj:
                self.info = obj
            elif "window" in obj:
                self.lines.append(obj)
            elif "bad_pages" in obj:
                self.checks.append(obj)

    def wait_ready(self, timeout: float = 120.0, windows: int = 2) -> None:
        """Until the dirtier has run ``windows`` windows (its rate is then steady)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.poll_console()
            if len(self.lines) >= windows:
                return
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"QEMU exited ({self.proc.returncode}): {err[-500:]}")
            time.sleep(0.2)
        raise RuntimeError(f"the VM (rate {self.rate}) did not start its dirtier in {timeout} s")

    def truth(self, first: int, last: int | None = None) -> dict:
        """The dirtier's windows ``first`` .. ``last - 1`` (indices into ``lines``;
        ``last`` None: up to the newest)."""
        self.poll_console()
        ws = self.lines[first:last]
        if not ws:
            raise RuntimeError("no dirtier windows in that span")
        # per real second, over the span: a window that took longer (the guest fell
        # behind) wrote its pages in more time, and the next, catching up, in less
        secs = sum(w.get("ms", 1000) for w in ws) / 1000
        d = [w["distinct"] for w in ws]
        own = [w.get("own", 0) for w in ws]
        return {"windows": len(ws), "distinct_mean": sum(d) / secs,
                "own_mean": sum(own) / secs, "seconds": secs,
                "late": sum(1 for w in ws if w.get("ms", 1000) > 1050),
                "writes_mean": sum(w["writes"] for w in ws) / len(ws),
                "distinct_min": min(d), "distinct_max": max(d)}

    # -- QMP --------------------------------------------------------------------------

    def qmp(self, *commands: tuple[str, dict | None], timeout: float = 60.0) -> list[dict]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.qmp_path))
        f = s.makefile("rw")
        try:
            json.loads(f.readline())  # greeting
            out = []
            for name, args in (("qmp_capabilities", None), *commands):
                msg = {"execute": name, **({"arguments": args} if args else {})}
                f.write(json.dumps(msg) + "\n")
                f.flush()
                while True:
                    r = json.loads(f.readline())
                    if "return" in r or "error" in r:
                        break
                if name != "qmp_capabilities":
                    out.append(r)
            return out
        finally:
            f.close()
            s.close()

    def calc_dirty_rate(self, calc_time_s: int = 1, sample_pages: int = 512) -> dict:
        """QEMU's own estimate (page-sampling); MB/s as QEMU reports it (MiB, an integer)."""
        (r,) = self.qmp(("calc-dirty-rate", {"calc-time": calc_time_s,
                                             "sample-pages": sample_pages,
                                             "mode": "page-sampling"}))
        if "error" in r:
            raise RuntimeError(f"calc-dirty-rate: {r['error']}")
        deadline = time.monotonic() + calc_time_s + 30
        while time.monotonic() < deadline:
            time.sleep(0.2)
            (q,) = self.qmp(("query-dirty-rate", None))
            ret = q.get("return", {})
            if ret.get("status") == "measured":
                return ret
        raise RuntimeError("calc-dirty-rate did not finish")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_vms(rates: list[int], **kw) -> list[VM]:
    """Boot one VM per rate (in parallel) and wait until each dirties."""
    vms = [VM(rate, seed=i + 1, **kw).start() for i, rate in enumerate(rates)]
    try:
        for vm in vms:
            vm.wait_ready()
    except BaseException:
        for vm in vms:
            vm.stop()
        raise
    return vms
