"""Builds udamon's optional C extensions: the controlled sampling loop
(udamon.primitives._uffd_loop), DAMON's region adjustment (udamon.core._regions)
and the page-fault tracer's ring reader (udamon.system._perf_ring).

Everything else is in pyproject.toml.  The extension is optional, as psutil's
platform code is not: when it cannot be compiled (no C compiler, no Python
headers) the install goes on and udamon uses the pure-Python/numpy versions of
the same code, saying so once when a session starts.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # pragma: no cover - depends on the build machine
            print(f"udamon: the C extensions were not built ({e}); using the Python code")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # pragma: no cover - depends on the build machine
            print(f"udamon: building {ext.name} failed ({e}); using its Python version")


setup(
    ext_modules=[Extension("udamon.primitives._uffd_loop",
                           ["src/udamon/primitives/_uffd_loop.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
                           optional=True),
                 Extension("udamon.core._regions", ["src/udamon/core/_regions.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
                           optional=True),
                 Extension("udamon.system._perf_ring", ["src/udamon/system/_perf_ring.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
                           optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
