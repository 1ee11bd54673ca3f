"""Which primitives exist, which this machine can run, and how to make a live one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from udamon.errors import RuntimeFailure, UsageError
from udamon.primitives.base import Primitive

if TYPE_CHECKING:  # the core is above the primitives: only its type, not its code
    from udamon.core.attrs import Attrs


@dataclass(frozen=True)
class Entry:
    name: str
    help: str
    live: bool
    available: Callable[[], tuple[bool, str]]
    make: Callable[..., Primitive] | None = None  # (attrs, **primitive options)
    # True when the primitive can attach to a launched command before it execs
    # (a tracer follows exec); False when it needs the program's own mappings.
    attach_before_exec: bool = True
    # Defaults of the monitoring intervals: DAMON's unless measured otherwise.
    default_sample_us: int = 5_000
    default_aggr_us: int = 100_000
    # False: never picked by 'auto' (it needs options that say where reports come from)
    auto: bool = True
    # True: it runs a monitor of its own (the kernel's DAMON) and takes the session's
    # ranges and whether they are physical as options (make(attrs, ranges=, paddr=))
    own_monitor: bool = False


def _hint_available() -> tuple[bool, str]:
    from udamon.primitives.hint import hint_available

    return hint_available()


def _make_hint(attrs: Attrs, *, scan_period_ms: int | None = None,
               scan_size_mb: int | None = None) -> Primitive:
    from udamon.primitives.hint import HintPrimitive

    return HintPrimitive(attrs.sample_us, scan_period_ms=scan_period_ms,
                         scan_size_mb=scan_size_mb)


def _uffd_available(name: str) -> tuple[bool, str]:
    import os

    from udamon.primitives.uffd import uffd_available
    from udamon.primitives.uffd_abi import MODES

    if os.geteuid() != 0:
        return False, f"the {name} primitive needs root (ptrace injection, pagemap)"
    return uffd_available(MODES[name])


def _make_uffd(name: str, attrs: Attrs) -> Primitive:
    from udamon.primitives.uffd import RwpPrimitive, WpPrimitive

    cls = WpPrimitive if name == "wp" else RwpPrimitive
    # every armed page may fault once per turn: size the fault rings for a window
    return cls([], faults_per_window=attrs.max_nr_regions * attrs.aggr_samples)


def _make_external(attrs: Attrs, *, socket_path: str | None = None,
                   stdin: bool = False) -> Primitive:
    from udamon.primitives.external import ExternalPrimitive

    return ExternalPrimitive(socket_path, stdin=stdin)


def _pmu_available() -> tuple[bool, str]:
    from udamon.primitives.pmu import pmu_available

    return pmu_available()


def _make_pmu(attrs: Attrs) -> Primitive:
    from udamon.primitives.pmu import PmuPrimitive

    return PmuPrimitive()


def _kernel_available() -> tuple[bool, str]:
    from udamon.system.kernel_sysfs import kernel_available

    return kernel_available()


def _make_kernel(attrs: Attrs, **options) -> Primitive:
    from udamon.primitives.kernel import KernelPrimitive

    return KernelPrimitive(attrs, **options)


ENTRIES: dict[str, Entry] = {
    "replay": Entry("replay", "recorded reports from a CSV file (--input)", False,
                    lambda: (True, "")),
    # 'auto' takes the first live entry this machine can run: rwp, then hint, then wp
    "rwp": Entry("rwp", "userfaultfd async read-write protection injected into the target: "
                 "DAMON's controlled sampling of reads and writes (one page per region per "
                 "sampling interval), attributed to CPU/thread (root, x86_64, Linux 7.3+ "
                 "with CONFIG_USERFAULTFD_RWP; DAMON's default intervals 5ms/100ms)", True,
                 lambda: _uffd_available("rwp"), lambda attrs: _make_uffd("rwp", attrs),
                 attach_before_exec=False),
    "hint": Entry("hint", "NUMA-balancing hinting faults: reads and writes, any CPU, "
                  "attributed to CPU/node/thread (root; changes kernel.numa_balancing "
                  "for the session)", True, _hint_available, _make_hint),
    "wp": Entry("wp", "userfaultfd async write-protect injected into the target: controlled "
                "write sampling (one page per region per sampling interval), attributed to "
                "CPU/thread (root, x86_64; DAMON's default intervals 5ms/100ms, see "
                "docs/primitives.md)", True, lambda: _uffd_available("wp"),
                lambda attrs: _make_uffd("wp", attrs),
                attach_before_exec=False),
    "pmu": Entry("pmu", "precise memory sampling (Intel PEBS, AMD IBS op, Arm SPE) through "
                 "perf_event_open: address, CPU, thread, load/store, memory level (root or "
                 "CAP_PERFMON; hardware that has it)", True, _pmu_available, _make_pmu),
    "external": Entry("external", "reports pushed by other programs over --socket PATH or "
                      "--input - (binary records or CSV; docs/report-channel.md); no "
                      "privileges needed", True, lambda: (True, ""), _make_external,
                      auto=False),
    "kernel": Entry("kernel", "the kernel's own DAMON (sysfs): vaddr on --pid (fvaddr with "
                    "--range), paddr with --paddr; the kernel's regions, nr_accesses, ages and "
                    "probes (anon, memcg: Linux 7.2+; weights: 7.3); it cannot tell "
                    "CPU, thread, read or write (root; a kdamond of udamon's own, never one "
                    "it did not start)", True, _kernel_available, _make_kernel,
                    attach_before_exec=False, auto=False, own_monitor=True),
}


def names() -> list[str]:
    return ["auto", *ENTRIES]


def entry(name: str) -> Entry:
    try:
        return ENTRIES[name]
    except KeyError:
        raise UsageError(f"unknown primitive {name!r} (known: {', '.join(ENTRIES)})") from None


def best_live() -> str:
    """'auto': the first live primitive this machine can run, or a clear error."""
    return choose_live()[0]


def choose_live() -> tuple[str, str]:
    """'auto': (the first live primitive this machine can run, why it and not the ones
    before it), or a clear error naming what each lacks."""
    reasons = []
    for e in ENTRIES.values():
        if not e.live or not e.auto:
            continue
        ok, why = e.available()
        if ok:
            skipped = f" ({'; '.join(reasons)})" if reasons else ""
            return e.name, f"auto chose {e.name}{skipped}"
        reasons.append(f"not {e.name}: {why}")
    raise RuntimeFailure("no live primitive can run here (" + "; ".join(reasons) + ")")


def make_live(name: str, attrs: Attrs, **options: object) -> Primitive:
    """A live primitive; ``options`` are its own (e.g. hint's scan tunables)."""
    e = entry(name)
    if not e.live or e.make is None:
        raise UsageError(f"primitive {name!r} does not monitor live processes")
    ok, why = e.available()
    if not ok:
        raise RuntimeFailure(f"primitive {name!r} cannot run here: {why}")
    return e.make(attrs, **options)
