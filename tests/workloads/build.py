"""Compile the C workloads in this directory into a cache directory.

``build("access_pattern")`` compiles ``access_pattern.c`` with ``gcc -O2 -pthread``
into ``/tmp/udamon-workloads-<hash>/access_pattern`` (the hash covers the source
and the compiler command) and returns the path; an existing binary is reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-pthread", "-Wall", "-Wextra"]


class BuildError(RuntimeError):
    pass


def build(name: str, src: Path | None = None) -> str:
    """``src``: a C file elsewhere (e.g. the shipped client demo); its directory is on
    the include path and its headers are part of the hash."""
    src = src or HERE / f"{name}.c"
    if not src.is_file():
        raise BuildError(f"no workload source {src}")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BuildError("no C compiler (gcc) found")
    blob = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))
    digest = hashlib.sha256(blob + " ".join(CFLAGS).encode()).hexdigest()[:16]
    outdir = Path(tempfile.gettempdir()) / f"udamon-workloads-{digest}"
    out = outdir / name
    if out.is_file() and os.access(out, os.X_OK):
        return str(out)
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / f".{name}.{os.getpid()}.tmp"
    proc = subprocess.run([gcc, *CFLAGS, "-I", str(src.parent), "-o", str(tmp), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"gcc failed for {src}:\n{proc.stderr}")
    os.replace(tmp, out)  # atomic: concurrent builders never see a half-written binary
    return str(out)


if __name__ == "__main__":
    import sys

    for n in sys.argv[1:] or ["access_pattern"]:
        print(build(n))
