"""The interface every primitive implements.

Three kinds plug in behind it (DESIGN.md, "Semantics that must match DAMON"):

* **observational** primitives (hint, pmu, replay, external reporters) see
  accesses wherever they happen; the core counts a region as accessed in a
  sampling interval when a passing report lands anywhere in it.
* **controlled** primitives (wp, rwp) are told, each sampling interval, which
  one page per region to watch (``arm``); they report only accesses to those
  pages, and the core counts a region only when its armed page was hit.
* **regions** primitives (kernel: the kernel's own DAMON) run a whole DAMON of
  their own and hand over, per aggregation, each target's regions with their
  ``nr_accesses``, ``age`` and probe hits (``aggregations``); these become the
  monitor's regions (``Monitor.supply``): udamon neither splits nor merges them.
  Reports other primitives deliver in the same session would count as probe hits
  over those regions (the monitor supports it; the several-primitives session
  that feeds both is udamon.Session's job).

The session driver calls ``start`` once, then per aggregation interval
``sample_window`` (controlled kind: it runs the interval's sampling turns, one
page per region per turn, as DAMON's kdamond does), ``wait``/``poll``
(observational kind) or ``wait``/``aggregations`` (regions kind), and ``stop`` on
every exit path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from udamon.system.fdwait import wait_fds

Kind = Literal["observational", "controlled", "regions"]
# What a primitive knows about what it sampled: "controlled" (it armed the
# pages itself), "complete" (it saw every access, e.g. a replay of a full
# trace) or "unknown" (someone else decides what is sampled, e.g. the NUMA
# balancing scanner for hint).  Where coverage is unknown a quiet period means
# "not observed", not "not accessed".
Coverage = Literal["controlled", "complete", "unknown"]


@dataclass
class Window:
    """The sampling turns of one aggregation interval, for a controlled primitive.

    Turn ``t`` runs from ``tick0_ns + t * sample_ns`` for one sampling interval and
    watches ``plans[pid][t]`` (one page-aligned address per region of that target,
    chosen by the core).  ``first`` is the turn to start with: a window that ended
    early (a target exited or exec'd, a stop) is resumed from there."""

    tick0_ns: int
    sample_ns: int
    plans: dict[int, np.ndarray]  # pid -> (turns, regions) uint64
    first: int = 0
    turns: int = -1  # number of turns; -1: the plans' first dimension

    def __post_init__(self) -> None:
        if self.turns < 0:
            self.turns = max((int(p.shape[0]) for p in self.plans.values()), default=0)


@dataclass
class SuppliedRegions:
    """One target's regions at the end of one aggregation of a regions primitive's own
    DAMON: what a kdamond has when it resets the aggregation."""

    pid: int
    start_ns: int  # the aggregation's start and end (CLOCK_MONOTONIC)
    end_ns: int
    sample_us: int  # the sampling interval in force (auto-tuning changes it)
    start: np.ndarray  # uint64, sorted, non-overlapping
    end: np.ndarray
    nr_accesses: np.ndarray  # int64: sampling intervals with an access, as the supplier saw
    age: np.ndarray
    probe_hits: dict[str, np.ndarray] = field(default_factory=dict)  # the supplier's probes


@dataclass
class PrimitiveStats:
    lost_samples: int = 0  # events the kernel or a reader lost before udamon saw them
    notes: list[str] = field(default_factory=list)  # one-line facts for the record header
    # notes the user must see at the end (also in ``notes``): the CLI prints them on stderr
    warnings: list[str] = field(default_factory=list)
    # more keys for the record's end line (e.g. external's per-producer counts)
    end: dict = field(default_factory=dict)
    # more keys for the record's header (e.g. which kdamond the kernel primitive ran)
    header: dict = field(default_factory=dict)


class Primitive:
    name: str = "?"
    kind: Kind = "observational"
    coverage: Coverage = "unknown"
    # Observational kind: how late a report may arrive after the time it carries
    # (another process's pipeline buffers it); the session closes each aggregation
    # interval this much after its end, so such reports still count in their own.
    report_delay_ns: int = 0

    def start(self, pids: list[int]) -> None:  # noqa: B027 - optional hook
        """Begin observing the given target processes."""

    def arm(self, pid: int, addrs: np.ndarray) -> None:  # noqa: B027 - controlled only
        """Controlled kind: watch the pages holding ``addrs`` until the next poll."""

    def sample_window(self, window: Window, stop_fd: int = -1) -> tuple[np.ndarray, int]:
        """Controlled kind: run the window's turns from ``window.first``; return the
        reports (accesses to armed pages) and the next turn to run, less than
        ``window.turns`` when the window ended early (a target exited, ``stop_fd``
        became readable).  The default runs each turn as ``arm`` + sleep + ``poll``."""
        import time

        parts = []
        for t in range(window.first, window.turns):
            end = window.tick0_ns + (t + 1) * window.sample_ns
            for pid, plan in window.plans.items():
                self.arm(pid, plan[t])
            delay = (end - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            parts.append(self.poll(time.monotonic_ns()))
        from udamon.intake.reports import empty

        return (np.concatenate(parts) if parts else empty()), window.turns

    def poll(self, now_ns: int) -> np.ndarray:
        """Observational kind (and a controlled one's single turn after ``arm``): the
        reports (REPORT_DTYPE) collected since the last poll.  A data-driven primitive
        (replay) is read through its chunks instead and keeps this default."""
        from udamon.intake.reports import empty

        return empty()

    def claim_probes(self, probes: list) -> list[str]:
        """Regions kind: the names of the probes (udamon.probes.probe.Probe) this primitive
        counts itself (the kernel's probe filters); the monitor counts the others.  Called
        before ``start``; UsageError for a probe it can neither count nor leave to others."""
        return []

    def aggregations(self) -> list[SuppliedRegions]:
        """Regions kind: the aggregations completed since the last call (every target of
        one aggregation together, in time order)."""
        return []

    def wait(self, timeout_s: float, wake_fd: int = -1) -> bool:
        """Observational and regions kinds: block until reports (or aggregations) may be
        waiting (True), ``wake_fd`` (when >= 0) is readable, or the timeout passes
        (False).  The default just sleeps.  ``wake_fd`` is the session's stop flag: the
        loop can then wait a whole latency in one call (a subclass whose ``wait`` takes
        no ``wake_fd`` is woken every 0.1 s instead)."""
        return wait_fds([], timeout_s, wake_fd)

    def exited(self) -> list[int]:
        """Pids among the targets that have exited since the last call (each once)."""
        return []

    def exhausted(self) -> bool:
        """True once the primitive will never report again (its input has ended): the
        session then ends with reason ``input-exhausted``."""
        return False

    def gone_at_start(self) -> list[int]:
        """Targets that exited while ``start()`` ran and are not observed (the others are)."""
        return []

    def stats(self) -> PrimitiveStats:
        return PrimitiveStats()

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Release everything; must be safe to call more than once."""

