"""``udamon ksm-advise``: what memory to give KSM, seen by content and write-coldness; apply it.

Observation: udamon.primitives.write_track (every page of the targets'
writable anonymous mappings write-protected; the last write of each known to
within --interval).  At the end: the resident pages of the anonymous private
mappings hashed (udamon.targets.content), and udamon.report.ksm_advice ranks
page-level candidate ranges by predicted saving.  --apply marks them
MADV_MERGEABLE (and write-hot ranges already offered to KSM MADV_UNMERGEABLE)
inside the target (udamon.targets.madvise, through the ptrace injection path),
then waits for KSM and reports predicted against actual (/proc/PID/ksm_stat).
KSM's global settings are changed only with --ksm-run, and restored at the end
(udamon.primitives.sysctl_guard, also when udamon is killed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from udamon.cli.common import duration_arg, pid_list, typed
from udamon.errors import RuntimeFailure, TargetGone, UsageError

DESCRIPTION = """\
Find the memory KSM would merge and that stays merged: pages whose content
another page of the targets has (hashed, all-zero pages counted apart) and that
are not written (every page write-protected for --duration; the last write of
each known to within --interval).  Candidate ranges are page-exact, joined over
short gaps, and ranked by predicted saving: the pages KSM would merge
(ksm_merging_pages) or map to the zero page (ksm_zero_pages), times the page
size.

--apply offers the candidates to KSM (madvise MADV_MERGEABLE, run inside the
target by ptrace) and takes write-hot ranges back (MADV_UNMERGEABLE, where they
were offered), then waits up to --wait for KSM and prints predicted against
actual.  --dry-run says what --apply would do.  KSM's own settings are left as
they are unless --ksm-run is given: then ksmd runs (with --ksm-pages-to-scan /
--ksm-sleep if given) for this command only, and every setting is put back at
the end -- pages merged meanwhile stay merged.
"""

EPILOG = """\
examples:
  udamon ksm-advise --pid 4101,4102 --duration 30s
  udamon ksm-advise --pid 4101 --apply --dry-run
  udamon ksm-advise --pid 4101 --apply --ksm-run --ksm-pages-to-scan 2000 --wait 60s
  udamon report ksm -i ksm.jsonl --format json     (a record written with -o ksm.jsonl)

Exit codes: 0 ok, 1 runtime failure (no userfaultfd write-protect, no KSM for --apply),
2 bad usage."""


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("ksm-advise", help="what to give KSM: duplicate, unwritten memory by "
                                          "page; --apply marks it mergeable",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=typed(pid_list, "pid list"), action="append", required=True,
                   metavar="PID[,PID...]", help="target processes (repeatable)")
    g = p.add_argument_group("observation")
    g.add_argument("--duration", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=10_000_000_000, help="watch writes this long (default 10s)")
    g.add_argument("--interval", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=1_000_000_000, help="write scan interval (default 1s)")
    g.add_argument("--min-age", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=None, help="cold = not written for this long (default: 10 s or "
                                      "half the duration, whichever is smaller)")
    a = p.add_argument_group("acting on it")
    a.add_argument("--apply", action="store_true",
                   help="madvise the candidates MADV_MERGEABLE and write-hot mergeable ranges "
                        "MADV_UNMERGEABLE in the targets, then wait for KSM and compare")
    a.add_argument("--dry-run", action="store_true", help="with --apply: only say what it "
                                                          "would do")
    a.add_argument("--top", type=typed(_positive_int, "count"), metavar="N",
                   help="at most N candidate ranges per target (shown and applied)")
    a.add_argument("--no-unmerge", action="store_true",
                   help="with --apply: do not MADV_UNMERGEABLE the write-hot ranges")
    a.add_argument("--wait", metavar="DUR", type=typed(duration_arg, "duration"),
                   default=60_000_000_000, help="with --apply: wait this long at most for KSM "
                                                "to merge (default 60s)")
    k = p.add_argument_group("KSM's global settings (changed only when asked, restored at exit)")
    k.add_argument("--ksm-run", action="store_true", help="run ksmd for this command")
    k.add_argument("--ksm-pages-to-scan", type=typed(_positive_int, "count"), metavar="N",
                   help="with --ksm-run: pages ksmd scans per wake-up")
    k.add_argument("--ksm-sleep", metavar="DUR", type=typed(duration_arg, "duration"),
                   help="with --ksm-run: ksmd's sleep between wake-ups (e.g. 20ms)")
    o = p.add_argument_group("output")
    o.add_argument("--format", choices=["text", "json"], default="text")
    o.add_argument("-o", "--output", metavar="FILE", help="also write the advice as a record "
                                                          "(udamon report ksm -i FILE)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def _check(a: argparse.Namespace) -> None:
    if a.dry_run and not a.apply:
        raise UsageError("--dry-run goes with --apply")
    if (a.ksm_pages_to_scan or a.ksm_sleep) and not a.ksm_run:
        raise UsageError("--ksm-pages-to-scan and --ksm-sleep go with --ksm-run")
    if a.interval > a.duration:
        raise UsageError("--interval must not be longer than --duration")
    if a.ksm_sleep is not None and a.ksm_sleep < 1_000_000:
        raise UsageError("--ksm-sleep must be at least 1ms")


def run(a: argparse.Namespace) -> int:
    from udamon.cli.live import install_stop
    from udamon.primitives.write_track import WriteTracker
    from udamon.targets import ksm
    from udamon.targets.procmaps import read_vmas

    _check(a)
    pids = sorted({p for group in a.pid for p in group})
    for pid in pids:
        try:
            read_vmas(pid)
        except TargetGone as e:
            raise UsageError(str(e)) from None
    have, why = ksm.available()
    if (a.apply and not a.dry_run or a.ksm_run) and not have:
        raise RuntimeFailure(why)
    stop = install_stop()
    tracker = WriteTracker(pids)
    tracker.start()
    t_end = tracker.start_ns + a.duration
    try:
        while not stop.is_set():
            left = t_end - time.monotonic_ns()
            if left <= 0:
                break
            stop.wait(min(a.interval, left) / 1e9)
            tracker.scan()
            if len(tracker.exited()) == len(pids):
                break
            if not a.quiet and sys.stderr.isatty():
                done = (time.monotonic_ns() - tracker.start_ns) / 1e9
                print(f"\rudamon: watching writes {done:.0f}/{a.duration / 1e9:.0f} s",
                      end="", file=sys.stderr, flush=True)
        end_ns = time.monotonic_ns()
        histories = {p: tracker.history(p, end_ns) for p in pids if p not in tracker.exited()}
        notes = tracker.prim.stats().notes
    finally:
        tracker.stop()  # closes the uffd: every protection is dropped
        if not a.quiet and sys.stderr.isatty():
            print("", file=sys.stderr)
    for p in pids:
        if p not in histories:
            print(f"udamon: note: process {p} exited while watched", file=sys.stderr)
    if not histories:
        raise RuntimeFailure("every target exited: nothing to advise")
    settings = ksm.settings() if have else {}
    adv = _advise(a, histories, tracker, end_ns, settings)
    adv.notes += notes
    others = ksm.mergeable_processes(set(pids)) if have else []
    if others:
        names = ", ".join(f"{p} ({c})" for p, c in others[:5])
        adv.notes.append(f"other processes offer memory to KSM ({names}"
                         f"{', ...' if len(others) > 5 else ''}): KSM also scans theirs")
    applied = None
    if a.apply:
        applied = _apply(a, adv, settings, others)
    doc = None
    if a.output or a.format == "json":
        from udamon.report.ksm_advice import to_json

        doc = to_json(adv, a.output)
        if applied is not None:
            doc["apply"] = applied
    if a.output:
        _write_record(a, adv, doc)
    if a.format == "json":
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from udamon.report.ksm_advice import to_text

        sys.stdout.write(to_text(adv, [f"udamon ksm-advise: {len(pids)} target(s)"],
                                 a.top or 20))
        if applied is not None:
            sys.stdout.write(_apply_text(applied))
    return 0


def _advise(a, histories, tracker, end_ns, settings):
    import os

    import numpy as np

    from udamon.primitives.page_scan import SpanScanner
    from udamon.primitives.uffd_loop import MmGone
    from udamon.report.ksm_advice import TargetPages, advise
    from udamon.targets import ksm
    from udamon.targets.content import hash_runs
    from udamon.targets.procmaps import process_name, read_vmas
    from udamon.targets.vmm import parse_smaps

    scanner = SpanScanner()
    pages = []
    for pid, h in histories.items():
        try:
            with open(f"/proc/{pid}/smaps") as f:
                maps = parse_smaps(f.read())
            vmas = read_vmas(pid)
        except (OSError, TargetGone):
            continue
        flags = {(m.start, m.end): m.flags for m in maps}
        elig = [v for v in vmas if v.private and v.anonymous and "r" in v.perms
                and not v.path.startswith("[v")]
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            lo = np.asarray([v.start for v in elig], np.uint64)
            hi = np.asarray([v.end for v in elig], np.uint64)
            rlo, rhi, _ = scanner.resident(fd, lo, hi)
        except MmGone:
            continue
        finally:
            os.close(fd)
        addr, hashes, zero = hash_runs(pid, rlo, rhi)
        writable = np.zeros(addr.size, dtype=bool)
        for v in elig:
            if "w" in v.perms:
                writable |= (addr >= np.uint64(v.start)) & (addr < np.uint64(v.end))
        since = h.watched_since(addr)
        # read-only mappings cannot be written: unwritten since the start; a writable one
        # that was not watched (not registrable) is unknown: never cold
        since = np.where(since >= 0, since, np.where(writable, end_ns, h.start_ns))
        pages.append(TargetPages(
            pid, process_name(pid), addr, hashes, zero, h.last_write(addr), since,
            h.writes(addr),
            [(v.start, v.end, "mg" in flags.get((v.start, v.end), ())) for v in elig],
            ksm.ksm_stat(pid) if settings else {}))
    adv = advise(pages, start_ns=tracker.start_ns, end_ns=end_ns,
                 intervals=tracker.intervals, settings=settings, min_age_ns=a.min_age)
    if a.top:
        for t in adv.targets:
            t.candidates = t.candidates[:a.top]
            t.merging_pages = sum(c.merging_pages for c in t.candidates)
            t.zero_merged = sum(c.zero_merged for c in t.candidates)
    return adv


def _apply(a, adv, settings, others) -> dict:
    from udamon.targets import ksm
    from udamon.targets.madvise import MADV_MERGEABLE, MADV_UNMERGEABLE, madvise_isolated

    calls: dict[int, list[tuple[int, int, int]]] = {}
    for t in adv.targets:
        c = [(r.start, r.size, MADV_MERGEABLE) for r in t.candidates]
        if not a.no_unmerge:
            c += [(r.start, r.size, MADV_UNMERGEABLE) for r in t.unmerge]
        calls[t.pid] = c
    out: dict = {"dry_run": a.dry_run, "ksm_run": a.ksm_run, "targets": []}
    if a.dry_run:
        for t in adv.targets:
            out["targets"].append({"pid": t.pid, "calls": _calls_doc(calls[t.pid]),
                                   "predicted_saving": t.predicted_saving})
        return out
    before = {t.pid: ksm.ksm_stat(t.pid) for t in adv.targets}
    results = {}
    for t in adv.targets:
        try:
            results[t.pid] = madvise_isolated(t.pid, calls[t.pid])
        except TargetGone as e:
            print(f"udamon: note: {e}", file=sys.stderr)
            results[t.pid] = None
    guard = None
    try:
        if a.ksm_run:
            from udamon.primitives.sysctl_guard import SettingsGuard

            if others:
                print(f"udamon: note: {len(others)} other process(es) offer memory to KSM: "
                      "--ksm-run makes ksmd scan theirs too", file=sys.stderr)
            guard = SettingsGuard(handle_signals=True)
            base = ksm.KSM_DIR
            if a.ksm_pages_to_scan:
                guard.set(f"{base}/pages_to_scan", str(a.ksm_pages_to_scan))
            if a.ksm_sleep:
                guard.set(f"{base}/sleep_millisecs", str(max(1, a.ksm_sleep // 1_000_000)))
            guard.set(f"{base}/run", "1")
        running = ksm.settings().get("run") == 1
        waited = _wait_ksm(a, [t.pid for t in adv.targets if results.get(t.pid) is not None]
                           ) if running else 0
        after = {}
        for t in adv.targets:
            try:
                after[t.pid] = ksm.ksm_stat(t.pid)
            except TargetGone:
                after[t.pid] = {}
    finally:
        if guard is not None:
            guard.restore()
    for t in adv.targets:
        st = after.get(t.pid, {})
        actual = (int(st.get("ksm_merging_pages", 0)) + int(st.get("ksm_zero_pages", 0))) * 4096
        out["targets"].append({
            "pid": t.pid, "calls": _calls_doc(calls[t.pid], results.get(t.pid)),
            "predicted_saving": t.predicted_saving, "actual_saving": actual,
            "ksm_stat_before": before.get(t.pid, {}), "ksm_stat_after": st})
    out["ksm_was_running"] = running
    out["waited_ns"] = waited
    if not running:
        out["note"] = ("KSM is not running (/sys/kernel/mm/ksm/run is 0): nothing merges until "
                       "it runs (--ksm-run runs it for this command)")
    return out


def _calls_doc(calls, results=None) -> list[dict]:
    from udamon.targets.madvise import MADV_MERGEABLE

    return [{"start": s, "end": s + n, "advice": "MADV_MERGEABLE" if adv == MADV_MERGEABLE
             else "MADV_UNMERGEABLE", **({"result": results[i]} if results else {})}
            for i, (s, n, adv) in enumerate(calls)]


def _wait_ksm(a, pids: list[int]) -> int:
    """Until the targets' merged pages stop growing over two of ksmd's full scans,
    or --wait; returns how long it waited."""
    from udamon.targets import ksm

    t0 = time.monotonic_ns()
    scans0 = ksm.counters().get("full_scans", 0)
    last, stable_since = None, None
    while time.monotonic_ns() - t0 < a.wait:
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
        if not a.quiet and sys.stderr.isatty():
            print(f"\rudamon: waiting for KSM: {sum(cur) * 4096 >> 20} MiB merged, "
                  f"{scans - scans0} full scans", end="", file=sys.stderr, flush=True)
    if not a.quiet and sys.stderr.isatty():
        print("", file=sys.stderr)
    return time.monotonic_ns() - t0


def _apply_text(ap: dict) -> str:
    from udamon.units import fmt_duration_ns, fmt_size

    lines = ["", "--apply" + (" --dry-run: would call, in each target:" if ap["dry_run"]
                              else ":")]
    for t in ap["targets"]:
        for c in t["calls"]:
            res = ""
            if "result" in c:
                res = " -> ok" if c["result"] == 0 else f" -> error {-c['result']}"
            size = fmt_size(c["end"] - c["start"])
            lines.append(f"  pid {t['pid']}: madvise({c['start']:#x}, {size}, {c['advice']})"
                         f"{res}")
        if not ap["dry_run"]:
            pred, act = t["predicted_saving"], t["actual_saving"]
            ratio = f" ({act / pred:.0%} of predicted)" if pred else ""
            lines.append(f"  pid {t['pid']}: predicted saving {fmt_size(pred)}, actual "
                         f"{fmt_size(act)}{ratio} (ksm_merging_pages "
                         f"{t['ksm_stat_after'].get('ksm_merging_pages', '?')}, ksm_zero_pages "
                         f"{t['ksm_stat_after'].get('ksm_zero_pages', '?')})")
    if not ap["dry_run"]:
        if ap.get("note"):
            lines.append(f"note: {ap['note']}")
        else:
            lines.append(f"waited {fmt_duration_ns(ap['waited_ns'])} for KSM"
                         + ("; KSM's settings restored" if ap["ksm_run"] else ""))
    return "\n".join(lines) + "\n"


def _write_record(a, adv, doc: dict) -> None:
    from udamon.core.attrs import Attrs
    from udamon.record.writer import RecordWriter, build_header

    class _T:
        def __init__(self, t):
            self.t = t

        def to_dict(self):
            return {"pid": self.t.pid, "name": self.t.name, "ranges": [], "follows_vmas": True}

    w = RecordWriter(a.output)
    iv = max(a.interval // 1000, 1)
    n = max(adv.intervals, 1)
    attrs = Attrs(sample_us=iv, aggr_us=iv * n, update_us=iv * n)
    est = {"kind": "ksm-advise", "min_age_ns": adv.min_age_ns, "interval_ns": a.interval,
           "ksm": adv.settings, "freed_bytes": adv.freed_bytes,
           "length_ns": adv.end_ns - adv.start_ns, "intervals": adv.intervals,
           "notes": adv.notes}
    w.write_header(build_header(attrs, "wp", "controlled", [], [],
                                [_T(t) for t in adv.targets], clock="monotonic",
                                notes=adv.notes, estimator=est))
    by_pid = {t["pid"]: t for t in doc["targets"]}
    applied = {t["pid"]: t for t in (doc.get("apply") or {}).get("targets", [])}
    for t in adv.targets:
        ksm_doc = dict(by_pid[t.pid])
        if t.pid in applied:
            ksm_doc["apply"] = applied[t.pid]
        w.write_snapshot({"time_ns": max(adv.end_ns, iv * n * 1000), "pid": t.pid,
                          "sample_us": iv, "aggr_us": iv * n, "regions": [], "ksm": ksm_doc})
    w.close("duration")
