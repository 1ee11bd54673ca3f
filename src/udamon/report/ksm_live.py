"""A live KSM advice: watch the targets' writes, hash their pages, advise, and apply.

The library side of ``udamon ksm-advise`` (the CLI only turns options into a
``KsmSpec``):

* ``watch``: udamon.primitives.write_track for the duration (every page of the
  writable anonymous mappings write-protected, a scan per interval);
* ``look``: the resident pages of the anonymous private mappings hashed
  (udamon.targets.content) and joined with the write history, then
  udamon.report.ksm_advice decides;
* ``apply``: madvise in the targets (udamon.targets.madvise), KSM run for the
  command when asked (udamon.system.sysctl_guard restores its settings, also on
  SIGKILL), waiting for ksmd and reading /proc/PID/ksm_stat.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from udamon.core.attrs import Attrs
from udamon.errors import RuntimeFailure, TargetGone, UsageError
from udamon.primitives.page_scan import SpanScanner
from udamon.primitives.uffd_loop import MmGone
from udamon.primitives.write_track import WriteHistory, WriteTracker
from udamon.record.writer import RecordWriter, build_header
from udamon.report.ksm_advice import Advice, TargetPages, advise, to_json
from udamon.targets import ksm
from udamon.targets.content import hash_runs
from udamon.targets.madvise import MADV_MERGEABLE, MADV_UNMERGEABLE, madvise_isolated
from udamon.targets.procmaps import process_name, read_vmas
from udamon.targets.vmm import parse_smaps


@dataclass
class KsmSpec:
    pids: list[int]
    duration_ns: int = 10_000_000_000
    interval_ns: int = 1_000_000_000
    min_age_ns: int | None = None
    apply: bool = False
    dry_run: bool = False
    top: int | None = None
    unmerge: bool = True
    wait_ns: int = 60_000_000_000
    ksm_run: bool = False
    pages_to_scan: int | None = None
    sleep_ns: int | None = None
    output: str | None = None

    def check(self) -> None:
        if self.dry_run and not self.apply:
            raise UsageError("--dry-run goes with --apply")
        if (self.pages_to_scan or self.sleep_ns) and not self.ksm_run:
            raise UsageError("--ksm-pages-to-scan and --ksm-sleep go with --ksm-run")
        if self.interval_ns > self.duration_ns:
            raise UsageError("--interval must not be longer than --duration")
        if self.sleep_ns is not None and self.sleep_ns < 1_000_000:
            raise UsageError("--ksm-sleep must be at least 1ms")


def advise_live(spec: KsmSpec, stop, progress: Callable | None = None
                ) -> tuple[Advice, dict | None]:
    """Watch, look, advise, and (``spec.apply``) act; returns the advice and what
    --apply did (None without it)."""
    spec.check()
    for pid in spec.pids:
        try:
            read_vmas(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
    have, why = ksm.available()
    if (spec.apply and not spec.dry_run or spec.ksm_run) and not have:
        raise RuntimeFailure(why)
    histories, tracker, end_ns, notes = watch(spec, stop, progress)
    if not histories:
        raise RuntimeFailure("every target exited: nothing to advise")
    settings = ksm.settings() if have else {}
    adv = advise(look(histories, end_ns, settings), start_ns=tracker.start_ns, end_ns=end_ns,
                 intervals=tracker.intervals, settings=settings, min_age_ns=spec.min_age_ns)
    adv.notes += notes
    gone = [p for p in spec.pids if p not in histories]
    adv.notes += [f"process {p} exited while watched" for p in gone]
    if spec.top:
        for t in adv.targets:
            t.candidates = t.candidates[:spec.top]
            t.merging_pages = sum(c.merging_pages for c in t.candidates)
            t.zero_merged = sum(c.zero_merged for c in t.candidates)
    others = ksm.mergeable_processes(set(spec.pids)) if have else []
    if others:
        names = ", ".join(f"{p} ({c})" for p, c in others[:5])
        adv.notes.append(f"other processes offer memory to KSM ({names}"
                         f"{', ...' if len(others) > 5 else ''}): KSM also scans theirs"
                         + (", and --ksm-run makes ksmd scan theirs too" if spec.ksm_run
                            else ""))
    applied = apply(spec, adv) if spec.apply else None
    if spec.output:
        write_record(spec, adv, applied)
    return adv, applied


def watch(spec: KsmSpec, stop, progress: Callable | None
          ) -> tuple[dict[int, WriteHistory], WriteTracker, int, list[str]]:
    """Every page's last write, for the duration (or until a stop, or every target
    exited)."""
    tracker = WriteTracker(spec.pids)
    tracker.start()
    t_end = tracker.start_ns + spec.duration_ns
    try:
        while not stop.is_set():
            left = t_end - time.monotonic_ns()
            if left <= 0:
                break
            stop.wait(min(spec.interval_ns, left) / 1e9)
            tracker.scan()
            if len(tracker.exited()) == len(spec.pids):
                break
            if progress is not None:
                progress(time.monotonic_ns() - tracker.start_ns, spec.duration_ns)
        end_ns = time.monotonic_ns()
        histories = {p: tracker.history(p, end_ns) for p in spec.pids
                     if p not in tracker.exited()}
        notes = tracker.prim.stats().notes
    finally:
        tracker.stop()  # closes the uffd: every protection is dropped
    return histories, tracker, end_ns, notes


def look(histories: dict[int, WriteHistory], end_ns: int, settings: dict
         ) -> list[TargetPages]:
    """The targets' resident pages in KSM-eligible mappings (anonymous private),
    hashed, with their write history."""
    scanner = SpanScanner()
    out = []
    for pid, h in histories.items():
        try:
            with open(f"/proc/{pid}/smaps") as f:
                flags = {(m.start, m.end): m.flags for m in parse_smaps(f.read())}
            elig = [v for v in read_vmas(pid) if v.private and v.anonymous and "r" in v.perms
                    and not v.path.startswith("[v")]
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, TargetGone):
            continue
        try:
            rlo, rhi, _ = scanner.resident(fd, np.asarray([v.start for v in elig], np.uint64),
                                           np.asarray([v.end for v in elig], np.uint64))
            addr, hashes, zero = hash_runs(pid, rlo, rhi)
        except (MmGone, TargetGone):
            continue
        finally:
            os.close(fd)
        writable = np.zeros(addr.size, dtype=bool)
        for v in elig:
            if "w" in v.perms:
                writable |= (addr >= np.uint64(v.start)) & (addr < np.uint64(v.end))
        since = h.watched_since(addr)
        # read-only mappings cannot be written: unwritten since the start; a writable one
        # that was not watched (not registrable) is unknown: never cold
        since = np.where(since >= 0, since, np.where(writable, end_ns, h.start_ns))
        out.append(TargetPages(
            pid, process_name(pid), addr, hashes, zero, h.last_write(addr), since,
            h.writes(addr),
            [(v.start, v.end, "mg" in flags.get((v.start, v.end), ())) for v in elig],
            ksm.ksm_stat(pid) if settings else {}))
    return out


def _calls(spec: KsmSpec, adv: Advice) -> dict[int, list[tuple[int, int, int]]]:
    out = {}
    for t in adv.targets:
        c = [(r.start, r.size, MADV_MERGEABLE) for r in t.candidates]
        if spec.unmerge:
            c += [(r.start, r.size, MADV_UNMERGEABLE) for r in t.unmerge]
        out[t.pid] = c
    return out


def calls_doc(calls, results=None) -> list[dict]:
    return [{"start": s, "end": s + n, "advice": "MADV_MERGEABLE" if adv == MADV_MERGEABLE
             else "MADV_UNMERGEABLE", **({"result": results[i]} if results else {})}
            for i, (s, n, adv) in enumerate(calls)]


def apply(spec: KsmSpec, adv: Advice) -> dict:
    """madvise the ranges in the targets, then (KSM running) wait for ksmd and read
    what it merged."""
    calls = _calls(spec, adv)
    out: dict = {"dry_run": spec.dry_run, "ksm_run": spec.ksm_run, "targets": []}
    if spec.dry_run:
        out["targets"] = [{"pid": t.pid, "calls": calls_doc(calls[t.pid]),
                           "predicted_saving": t.predicted_saving} for t in adv.targets]
        return out
    before = {t.pid: ksm.ksm_stat(t.pid) for t in adv.targets}
    results: dict[int, list[int] | None] = {}
    for t in adv.targets:
        try:
            results[t.pid] = madvise_isolated(t.pid, calls[t.pid])
        except TargetGone as e:
            adv.notes.append(str(e))
            results[t.pid] = None
    running, waited, after = _run_ksm(spec, [t.pid for t in adv.targets
                                             if results.get(t.pid) is not None])
    for t in adv.targets:
        st = after.get(t.pid, {})
        actual = (int(st.get("ksm_merging_pages", 0)) + int(st.get("ksm_zero_pages", 0))) * 4096
        out["targets"].append({
            "pid": t.pid, "calls": calls_doc(calls[t.pid], results.get(t.pid)),
            "predicted_saving": t.predicted_saving, "actual_saving": actual,
            "ksm_stat_before": before.get(t.pid, {}), "ksm_stat_after": st})
    out["ksm_was_running"] = running
    out["waited_ns"] = waited
    if not running:
        out["note"] = ("KSM is not running (/sys/kernel/mm/ksm/run is 0): nothing merges until "
                       "it runs (--ksm-run runs it for this command)")
    return out


def _run_ksm(spec: KsmSpec, pids: list[int]) -> tuple[bool, int, dict[int, dict]]:
    """KSM's settings for the wait (only with --ksm-run, restored after), the wait,
    and each target's ksm_stat afterwards."""
    guard = None
    try:
        if spec.ksm_run:
            from udamon.system.sysctl_guard import SettingsGuard

            guard = SettingsGuard(handle_signals=True)
            if spec.pages_to_scan:
                guard.set(f"{ksm.KSM_DIR}/pages_to_scan", str(spec.pages_to_scan))
            if spec.sleep_ns:
                guard.set(f"{ksm.KSM_DIR}/sleep_millisecs", str(max(1, spec.sleep_ns // 10**6)))
            guard.set(f"{ksm.KSM_DIR}/run", "1")
        running = ksm.settings().get("run") == 1
        waited = wait_for_ksm(pids, spec.wait_ns) if running else 0
        after = {}
        for p in pids:
            try:
                after[p] = ksm.ksm_stat(p)
            except TargetGone:
                after[p] = {}
    finally:
        if guard is not None:
            guard.restore()
    return running, waited, after


def wait_for_ksm(pids: list[int], timeout_ns: int) -> int:
    """Until the targets' merged pages stop growing over two of ksmd's full scans, or
    the timeout; returns how long it waited."""
    t0 = time.monotonic_ns()
    scans0 = ksm.counters().get("full_scans", 0)
    last, stable_since = None, None
    while time.monotonic_ns() - t0 < timeout_ns:
        time.sleep(0.5)
        cur = []
        for p in pids:
            try:
                st = ksm.ksm_stat(p)
            except TargetGone:
                continue
            cur.append(int(st.get("ksm_merging_pages", 0)) + int(st.get("ksm_zero_pages", 0)))
        scans = ksm.counters().get("full_scans", 0)
        if cur != last:
            last, stable_since = cur, scans
        elif stable_since is not None and scans - stable_since >= 2 and scans - scans0 >= 2:
            break
    return time.monotonic_ns() - t0


class _T:
    def __init__(self, pid: int, name: str) -> None:
        self.pid, self.name = pid, name

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "ranges": [], "follows_vmas": True}


def write_record(spec: KsmSpec, adv: Advice, applied: dict | None) -> None:
    """The advice as a record: one snapshot per target with its ``ksm`` object."""
    doc = to_json(adv, spec.output)
    w = RecordWriter(spec.output)
    iv = max(spec.interval_ns // 1000, 1)
    n = max(adv.intervals, 1)
    est = {"kind": "ksm-advise", "min_age_ns": adv.min_age_ns, "interval_ns": spec.interval_ns,
           "ksm": adv.settings, "freed_bytes": adv.freed_bytes,
           "length_ns": adv.end_ns - adv.start_ns, "intervals": adv.intervals,
           "notes": adv.notes}
    w.write_header(build_header(Attrs(sample_us=iv, aggr_us=iv * n, update_us=iv * n), "wp",
                                "controlled", [], [], [_T(t.pid, t.name) for t in adv.targets],
                                clock="monotonic", notes=adv.notes, estimator=est))
    done = {t["pid"]: t for t in (applied or {}).get("targets", [])}
    for t in doc["targets"]:
        if t["pid"] in done:
            t["apply"] = done[t["pid"]]
        w.write_snapshot({"time_ns": max(adv.end_ns, iv * n * 1000), "pid": t["pid"],
                          "sample_us": iv, "aggr_us": iv * n, "regions": [], "ksm": t})
    w.close("duration")
