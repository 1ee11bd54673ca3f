#!/usr/bin/env python3
"""Prepare the two-node QEMU guest: a Debian Linux 7.3 kernel and a busybox initramfs.

Everything comes from Debian packages (``apt-get download``, no root needed
for that part) and is cached in ``$UDAMON_GUEST_CACHE`` (default
``/var/cache/udamon-guest`` as root, else ``~/.cache/udamon-guest``):

- Linux 7.3 from Debian's ``trixie-backports`` suite (newest ``7.3.<N>+deb13-amd64``
  listed), read through a *private* apt configuration in the cache (its own
  sources list, lists and archives; the machine's apt sources are never
  touched): ``linux-binary-<rel>`` holds ``vmlinuz``, ``linux-modules-<rel>``
  the modules the guest needs (netfs, 9pnet, 9pnet_virtio, 9p, overlay),
  decompressed and ordered by their ``depends=`` modinfo, ``linux-base-<rel>``
  the kernel config (checked for RWP, DAMON, NUMA balancing, KSM);
- ``busybox-static``: the initramfs's shell and tools;
- ``/init`` (see ``INIT`` below): mounts the host's root read-only over 9p,
  puts an overlay on tmpfs over it, mounts the results share and runs
  ``/udamon-results/guest.sh`` chrooted; its exit status goes to
  ``/udamon-results/status`` and the guest powers off.

``qemu-system-x86_64`` itself is a host package (qemu-system-x86); with
``--install`` and root, missing host packages are installed with apt-get.
Prints the cache directory.  Needs only the standard library, ``apt-get``
and ``dpkg-deb``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The guest kernel: Linux 7.3 (userfaultfd RWP, DAMON vaddr/paddr with probes and
# probe weights, NUMA balancing, KSM), from Debian trixie-backports.
SUITE = "trixie-backports"
KERNEL_RE = re.compile(r"^linux-binary-(7\.3\.(\d+)\+deb13-amd64) ")
NEEDED_CONFIG = ("CONFIG_NUMA_BALANCING=y", "CONFIG_NUMA=y", "CONFIG_USERFAULTFD_RWP=y",
                 "CONFIG_DAMON_VADDR=y", "CONFIG_DAMON_PADDR=y", "CONFIG_DAMON_SYSFS=y",
                 "CONFIG_KSM=y")
MODULES = ["9p", "9pnet_virtio", "overlay"]  # plus whatever they depend on
FORMAT = 5  # bump when the initramfs layout changes

INIT = r"""#!/bin/busybox sh
# udamon guest init (tests/guest/prepare.py): PID 1 in the initramfs.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /lower /upper /newroot /results
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "udamon-guest: init at $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "udamon-guest: insmod $m failed"
done
fail() {
    echo "udamon-guest: $*"; echo "udamon-guest: FAILED"; echo o > /proc/sysrq-trigger; sleep 5
}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /lower \
    || fail "cannot mount the host root (9p)"
mount -t tmpfs -o size=300m tmpfs /upper
mkdir -p /upper/up /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/up,workdir=/upper/work overlay /newroot \
    || fail "cannot mount the overlay"
mkdir -p /newroot/udamon-results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /newroot/udamon-results \
    || fail "cannot mount the results share"
for d in proc sys dev tmp run; do mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t tracefs tracefs /newroot/sys/kernel/tracing
mount -t debugfs debugfs /newroot/sys/kernel/debug
mkdir -p /newroot/.host && mount --bind /lower /newroot/.host  # the host root, as is
ip link set lo up 2>/dev/null
echo "udamon-guest: userspace ready at $(cut -d' ' -f1 /proc/uptime)s"
cut -d' ' -f1 /proc/uptime > /newroot/udamon-results/boot_s
chroot /newroot /bin/sh /udamon-results/guest.sh > /newroot/udamon-results/guest.log 2>&1
rc=$?
echo $rc > /newroot/udamon-results/status
sync
echo "udamon-guest: guest.sh exited $rc at $(cut -d' ' -f1 /proc/uptime)s"
umount /newroot/udamon-results
echo o > /proc/sysrq-trigger
sleep 10
"""


def default_cache() -> Path:
    env = os.environ.get("UDAMON_GUEST_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/udamon-guest")
    return Path.home() / ".cache" / "udamon-guest"


def log(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def debian_mirror() -> str:
    """The Debian mirror the machine's apt already uses (deb.debian.org otherwise)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(path.read_text(errors="replace"))
        except OSError:
            continue
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            for url in re.findall(r"(https?://\S+/debian)/?(?:\s|$)", line):
                return url
    return "http://deb.debian.org/debian"


class PrivateApt:
    """apt-get/apt-cache over one extra suite, with state kept under ``root``: its own
    sources list, package lists and archive cache (FACTS.md).  The machine's apt
    configuration and lists are not read or changed."""

    def __init__(self, root: Path, suite: str = SUITE, mirror: str | None = None):
        self.root = root
        self.suite = suite
        self.mirror = mirror or debian_mirror()
        self.sources = root / "sources.list"
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        line = f"deb [trusted=yes] {self.mirror} {suite} main\n"
        if not self.sources.is_file() or self.sources.read_text() != line:
            self.sources.write_text(line)

    def options(self) -> list[str]:
        opts = ["-o", f"Dir::Etc::SourceList={self.sources}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={self.root / 'lists'}",
                "-o", f"Dir::Cache={self.root / 'cache'}",
                "-o", "Debug::NoLocking=1"]
        if os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]
        return opts

    def update(self) -> None:
        log(f"apt-get update ({self.suite} from {self.mirror}, private lists)")
        run(["apt-get", *self.options(), "update", "-qq"], stdout=subprocess.DEVNULL)

    def search(self, regex: str) -> str:
        return subprocess.run(["apt-cache", *self.options(), "search", "--names-only", regex],
                              capture_output=True, text=True).stdout

    def download(self, pkg: str, cwd: Path) -> None:
        run(["apt-get", *self.options(), "download", "-q", pkg], cwd=cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def newest_kernel(apt: PrivateApt, update: bool) -> str:
    """Kernel release of the newest linux-binary-7.3.N+deb13-amd64 in the suite."""
    have_lists = any((apt.root / "lists").glob("*Packages*"))
    for attempt in range(2):
        if (attempt == 1 or not have_lists) and update:
            apt.update()
        out = apt.search(r"^linux-binary-7\.3\.[0-9]+\+deb13-amd64$")
        found = sorted((int(m.group(2)), m.group(1)) for line in out.splitlines()
                       if (m := KERNEL_RE.match(line)))
        if found:
            return found[-1][1]
        if not update:
            break
    raise SystemExit(f"prepare: no linux-binary-7.3.*+deb13-amd64 in {SUITE} at {apt.mirror} "
                     "(network? run without --no-update)")


def install_host_packages() -> None:
    need = []
    if shutil.which("qemu-system-x86_64") is None:
        need.append("qemu-system-x86")
    if shutil.which("dpkg-deb") is None:
        need.append("dpkg")
    if not need:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"prepare: missing {' '.join(need)} (install as root)")
    log(f"apt-get install {' '.join(need)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
                       env=env)
    if r.returncode != 0:
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], env=env)


def download(pkg: str, debs: Path, apt: PrivateApt | None = None) -> Path:
    """``pkg``'s .deb in ``debs`` (downloaded once), from the machine's apt or ``apt``."""
    stem = pkg + "_"
    have = [p for p in debs.glob("*.deb") if p.name.startswith(stem)]
    if have:
        return have[0]
    log(f"apt-get download {pkg}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        os.chmod(tmp, 0o755)  # so apt's sandbox user can write there when we are root
        if apt is not None:
            apt.download(pkg, Path(tmp))
        else:
            run(["apt-get", "download", "-q", pkg], cwd=tmp, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        got = [p for p in Path(tmp).glob("*.deb")]
        if not got:
            raise SystemExit(f"prepare: apt-get download {pkg} gave no .deb")
        dest = debs / got[0].name
        os.replace(got[0], dest)
    return dest


def modinfo_depends(ko: bytes) -> list[str]:
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if not m or not m.group(1):
        return []
    return [d.decode() for d in m.group(1).split(b",") if d]


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for p in [*root.glob("lib/modules/*/kernel/**/*.ko*"),
              *root.glob("usr/lib/modules/*/kernel/**/*.ko*")]:
        name = p.name.split(".ko")[0]
        out[name] = p
        out[name.replace("-", "_")] = p
    return out


def read_ko(p: Path) -> bytes:
    data = p.read_bytes()
    if p.name.endswith(".xz"):
        return lzma.decompress(data)
    if p.name.endswith(".gz"):
        return gzip.decompress(data)
    if p.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(p)], check=True, capture_output=True).stdout
    return data


def resolve_modules(root: Path, wanted: list[str]) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies, dependencies first."""
    files = module_files(root)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in files:
            raise SystemExit(f"prepare: module {name} not found in the kernel package")
        ko = read_ko(files[key])
        for dep in modinfo_depends(ko):
            visit(dep)
        order.append((key, ko))

    for w in wanted:
        visit(w)
    return order


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data); directories have data b""."""
    buf = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        nb = name.encode() + b"\x00"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        buf.write(hdr.encode() + nb)
        buf.write(b"\x00" * ((-(110 + len(nb))) % 4))
        buf.write(data)
        buf.write(b"\x00" * ((-len(data)) % 4))
        ino += 1
    return buf.getvalue()


def build_initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    d, f, x = 0o040755, 0o100644, 0o100755
    entries: list[tuple[str, int, bytes]] = [
        ("bin", d, b""), ("modules", d, b""), ("dev", d, b""), ("proc", d, b""),
        ("sys", d, b""), ("bin/busybox", x, busybox), ("bin/sh", x, busybox),
        ("init", x, INIT.encode()),
        ("modules/order", f, "\n".join(n for n, _ in modules).encode() + b"\n"),
    ]
    entries += [(f"modules/{n}.ko", f, ko) for n, ko in modules]
    return gzip.compress(cpio_newc(entries), compresslevel=6)


def prepare(cache: Path, *, install: bool = False, update: bool = True) -> Path:
    """Make ``cache/vmlinuz`` and ``cache/initramfs.gz``; return ``cache``."""
    if install:
        install_host_packages()
    cache.mkdir(parents=True, exist_ok=True)
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    manifest = cache / "guest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if (info.get("format") == FORMAT and (cache / "vmlinuz").is_file()
                and (cache / "initramfs.gz").is_file()
                and info.get("init_sha") == hash_text(INIT)):
            return cache
    apt = PrivateApt(cache / "apt")
    rel = newest_kernel(apt, update)
    kpkg = f"linux-binary-{rel}"
    kdebs = [download(f"linux-{part}-{rel}", debs, apt) for part in ("binary", "modules", "base")]
    bdeb = download("busybox-static", debs)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        kroot, broot = Path(tmp) / "k", Path(tmp) / "b"
        for d in kdebs:
            log(f"extracting {d.name}")
            run(["dpkg-deb", "-x", str(d), str(kroot)])
        run(["dpkg-deb", "-x", str(bdeb), str(broot)])
        vmlinuz = kroot / "usr" / "lib" / "modules" / rel / "vmlinuz"
        config = (kroot / "usr" / "lib" / "modules" / rel / "config").read_text()
        for opt in NEEDED_CONFIG:
            if opt not in config:
                raise SystemExit(f"prepare: {kpkg} lacks {opt}")
        modules = resolve_modules(kroot, MODULES)
        busybox = (broot / "bin" / "busybox").read_bytes()
        initrd = build_initramfs(busybox, modules)
        shutil.copyfile(vmlinuz, cache / "vmlinuz.tmp")
        os.replace(cache / "vmlinuz.tmp", cache / "vmlinuz")
        (cache / "initramfs.gz.tmp").write_bytes(initrd)
        os.replace(cache / "initramfs.gz.tmp", cache / "initramfs.gz")
    # keep only the debs in use
    for p in debs.glob("*.deb"):
        if p not in (*kdebs, bdeb):
            p.unlink()
    manifest.write_text(json.dumps({"format": FORMAT, "kernel": kpkg,
                                    "kernel_release": rel, "suite": SUITE,
                                    "modules": [n for n, _ in modules],
                                    "init_sha": hash_text(INIT)}, indent=1) + "\n")
    log(f"guest ready in {cache}: {kpkg}, modules {' '.join(n for n, _ in modules)}")
    return cache


def hash_text(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache(),
                    help="cache directory (default %(default)s; env UDAMON_GUEST_CACHE)")
    ap.add_argument("--install", action="store_true",
                    help="apt-get install missing host packages (qemu-system-x86), as root")
    ap.add_argument("--no-update", action="store_true",
                    help="never run apt-get update")
    a = ap.parse_args()
    print(prepare(a.cache, install=a.install, update=not a.no_update))
    return 0


if __name__ == "__main__":
    sys.exit(main())
