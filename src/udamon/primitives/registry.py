"""Which primitives exist, which this machine can run, and how to make a live one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from udamon.core.attrs import Attrs
from udamon.errors import RuntimeFailure, UsageError
from udamon.primitives.base import Primitive


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


def _hint_available() -> tuple[bool, str]:
    from udamon.primitives.hint import hint_available

    return hint_available()


def _make_hint(attrs: Attrs, *, scan_period_ms: int | None = None,
               scan_size_mb: int | None = None) -> Primitive:
    from udamon.primitives.hint import HintPrimitive

    return HintPrimitive(attrs.sample_us, scan_period_ms=scan_period_ms,
                         scan_size_mb=scan_size_mb)


def _wp_available() -> tuple[bool, str]:
    import os

    from udamon.primitives.uffd_wp import wp_available

    if os.geteuid() != 0:
        return False, "the wp primitive needs root (ptrace injection, pagemap)"
    return wp_available()


def _make_wp(attrs: Attrs) -> Primitive:
    from udamon.primitives.uffd_wp import WpPrimitive

    return WpPrimitive([])


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


ENTRIES: dict[str, Entry] = {
    "replay": Entry("replay", "recorded reports from a CSV file (--input)", False,
                    lambda: (True, "")),
    "hint": Entry("hint", "NUMA-balancing hinting faults: reads and writes, any CPU, "
                  "attributed to CPU/node/thread (root; changes kernel.numa_balancing "
                  "for the session)", True, _hint_available, _make_hint),
    "wp": Entry("wp", "userfaultfd async write-protect injected into the target: controlled "
                "write sampling (one page per region per sampling interval), attributed to "
                "CPU/thread (root, x86_64; default intervals 50ms/1s, see "
                "docs/primitives.md)", True, _wp_available, _make_wp,
                attach_before_exec=False,
                # every armed page the target writes costs a TLB-flush IPI and a fault:
                # 5 ms sampling slowed a write-heavy target by ~23%, 50 ms by ~3%
                default_sample_us=50_000, default_aggr_us=1_000_000),
    "pmu": Entry("pmu", "precise memory sampling (Intel PEBS, AMD IBS op, Arm SPE) through "
                 "perf_event_open: address, CPU, thread, load/store, memory level (root or "
                 "CAP_PERFMON; hardware that has it)", True, _pmu_available, _make_pmu),
    "external": Entry("external", "reports pushed by other programs over --socket PATH or "
                      "--input - (binary records or CSV; docs/report-channel.md); no "
                      "privileges needed", True, lambda: (True, ""), _make_external,
                      auto=False),
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
    reasons = []
    for e in ENTRIES.values():
        if not e.live or not e.auto:
            continue
        ok, why = e.available()
        if ok:
            return e.name
        reasons.append(f"{e.name}: {why}")
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
