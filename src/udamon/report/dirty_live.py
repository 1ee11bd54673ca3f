"""A live dirty-rate measurement: targets and their parts, windows until converged.

The library side of ``udamon dirty-rate`` (the CLI only turns options into a
``DirtyRateSpec``): each target's parts are chosen (``--range``, else a VMM's
guest RAM and its own memory, else the whole process), the estimator
(udamon.primitives.dirty_sample) runs window after window, udamon.report.dirty_rate
turns the windows into rates after each, and the run ends when every live
target has converged, at the duration, when the targets are gone, or on a stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from udamon.errors import RuntimeFailure, TargetGone, UsageError
from udamon.primitives.dirty_sample import DirtySampler, PartSpec, TargetWindow
from udamon.report import dirty_rate, precopy
from udamon.report.dirty_record import DirtyRecordWriter
from udamon.targets.procmaps import process_name, read_vmas
from udamon.targets.vmm import detect


@dataclass
class DirtyRateSpec:
    pids: list[int]
    window_ns: int = 1_000_000_000
    duration_ns: int = 10_000_000_000
    precision: float = dirty_rate.DEFAULT_PRECISION  # 0: run the whole duration
    confidence: float = dirty_rate.DEFAULT_CONFIDENCE
    exact: bool = False
    sample_pages: int = 512
    max_sample_pages: int = 65536
    ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    no_vmm: bool = False
    seed: int | None = None
    bandwidth_bps: float | None = None
    downtime_ns: int = precopy.DEFAULT_DOWNTIME_NS
    output: str | None = None  # record file


@dataclass
class DirtyRun:
    result: dirty_rate.DirtyRates
    reason: str  # converged, duration, targets-exited, interrupted
    notes: list[str]
    exited: list[int]


def plan(spec: DirtyRateSpec) -> tuple[dict[int, list[PartSpec]], list[dict], list[str]]:
    """Each target's parts, its description (pid, name, rate part, vmm, ranges) and
    notes for the user."""
    parts: dict[int, list[PartSpec]] = {}
    targets, notes = [], []
    for pid in spec.pids:
        try:
            read_vmas(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
        vmm = None
        if pid in spec.ranges:
            parts[pid] = [PartSpec("range", tuple(spec.ranges[pid])), PartSpec("rest")]
            rate_part = "range"
        else:
            info = None if spec.no_vmm else detect(pid)
            if info is not None and info.ram:
                parts[pid] = [PartSpec("guest-ram", info.ram), PartSpec("vmm")]
                rate_part, vmm = "guest-ram", info.to_dict()
            else:
                parts[pid] = [PartSpec("memory")]
                rate_part = "memory"
                if info is not None:
                    notes.append(f"pid {pid} looks like {info.kind} but no guest RAM mapping "
                                 "was found: measuring the whole process (--range says where "
                                 "guest RAM is)")
        targets.append({"pid": pid, "name": process_name(pid), "rate_part": rate_part,
                        "vmm": vmm, "ranges": [[s, e] for s, e in spec.ranges.get(pid, [])]})
    return parts, targets, notes


def rates(spec: DirtyRateSpec, targets: list[dict],
          windows: dict[int, list[TargetWindow]]) -> dirty_rate.DirtyRates:
    series = [dirty_rate.TargetSeries(t["pid"], t["name"], t["rate_part"], windows[t["pid"]],
                                      t["vmm"]) for t in targets]
    return dirty_rate.compute(series, window_ns=spec.window_ns, confidence=spec.confidence,
                              precision=spec.precision or dirty_rate.DEFAULT_PRECISION,
                              exact=spec.exact, bandwidth_bps=spec.bandwidth_bps,
                              downtime_ns=spec.downtime_ns)


def measure(spec: DirtyRateSpec, stop, progress: Callable | None = None) -> DirtyRun:
    """Run the windows.  ``stop``: a StopFlag (its fd ends a window at once);
    ``progress(result, windows)`` after each window."""
    if spec.window_ns > spec.duration_ns:
        raise UsageError("--window must not be longer than --duration")
    parts, targets, notes = plan(spec)
    sampler = DirtySampler(parts, window_ns=spec.window_ns, exact=spec.exact,
                           per_gib=spec.sample_pages, max_sample=spec.max_sample_pages,
                           seed=spec.seed)
    writer = DirtyRecordWriter(spec.output, targets, spec) if spec.output else None
    windows: dict[int, list[TargetWindow]] = {pid: [] for pid in spec.pids}
    sampler.start()
    try:
        if writer is not None:
            writer.begin(sampler.notes())
        reason = _loop(spec, sampler, stop, windows, writer, targets, progress)
    except BaseException as e:
        sampler.stop()
        if writer is not None:
            writer.fail(str(e) or type(e).__name__)
        raise
    notes += sampler.notes()
    sampler.stop()
    res = rates(spec, targets, windows)
    if writer is not None:
        writer.end("duration" if reason == "converged" else reason, notes, reason)
    if not res.targets:
        raise RuntimeFailure("no window completed: nothing to report")
    return DirtyRun(res, reason, notes, [p for p in spec.pids if p in sampler.exited()])


def _loop(spec, sampler, stop, windows, writer, targets, progress) -> str:
    t0 = time.monotonic_ns()
    while True:
        if stop.is_set():
            return stop.why
        if time.monotonic_ns() - t0 + spec.window_ns > spec.duration_ns + spec.window_ns // 10:
            return "duration"
        got = sampler.window(stop.fileno())
        for tw in got:
            windows[tw.pid].append(tw)
            if writer is not None:
                writer.window(tw)
        live = [p for p in spec.pids if p not in sampler.exited()]
        if not live:
            return "targets-exited"
        res = rates(spec, targets, windows)
        if progress is not None and got:
            progress(res, max(len(w) for w in windows.values()))
        if spec.precision and res.targets and all(t.converged for t in res.targets
                                                  if t.pid in live):
            return "converged"
