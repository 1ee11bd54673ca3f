"""What to give KSM: page-level candidate ranges ranked by the memory merging would save.

KSM merges a page when another page has the same content and neither changes
between two of ksmd's scans.  So a page is worth offering when it is

* **cold**: not written for at least ``min_age`` (udamon.primitives.write_track:
  every page write-protected, its last write known to within one interval;
  read-only mappings are never written), and
* **duplicated**: its content (udamon.targets.content: a 64-bit hash of its 4 KiB)
  equals that of another cold page of any target; all-zero pages are counted
  apart -- with ``use_zero_pages`` KSM maps them to the kernel's zero page
  (``ksm_zero_pages``), without it they merge with each other like any content.

Candidate ranges are runs of such pages within one anonymous private mapping,
joined over gaps of at most ``join_pages`` pages while at least
``min_density`` of the joined range is worth offering, and kept when they hold
``min_pages`` such pages or more (a range may thus hold a few pages that were
written or are unique: offering them costs KSM a look, nothing more; its
``unwritten_ns`` and ``never_written`` are those of the pages it would merge).
A range's **predicted saving** is what KSM's own per-process account would
show once it is merged: its pages that would be merged (``ksm_merging_pages``)
plus those that would go to the zero page (``ksm_zero_pages``), times the page
size -- the target's private memory given up.  The memory freed system-wide is
smaller by one kept copy per content (and per ``max_page_sharing`` sharers); it
is reported too.  Write-hot ranges of
mappings already offered to KSM (``MADV_MERGEABLE``) are listed apart: merged
pages there are broken again by every write (``MADV_UNMERGEABLE`` stops that).

Duplicates are looked for among the targets only: pages that would merge with
memory of other processes, or with KSM pages already there, are not predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from udamon.units import fmt_duration_ns, fmt_size

PAGE = 4096
DEFAULT_MIN_AGE_NS = 10_000_000_000
JOIN_PAGES = 16
MIN_DENSITY = 0.8
MIN_PAGES = 16
HOT_DENSITY = 0.5


@dataclass
class TargetPages:
    """One target's resident pages in KSM-eligible mappings, as observed."""

    pid: int
    name: str
    addr: np.ndarray  # uint64, sorted
    hash: np.ndarray  # uint64 content hashes
    zero: np.ndarray  # bool: all-zero content
    last_write_ns: np.ndarray  # int64, -1: not written while watched
    since_ns: np.ndarray  # int64: watched (or known unwritable) since
    writes: np.ndarray  # int64: intervals in which each was written
    vmas: list[tuple[int, int, bool]]  # eligible mappings (start, end, mergeable now)
    ksm_stat: dict = field(default_factory=dict)
    ksm_pages: int = -1  # pages that are KSM pages now (-1: unknown)


@dataclass
class Range:
    start: int
    end: int
    pages: int  # pages worth offering in it
    duplicate_pages: int
    zero_pages: int
    merging_pages: int  # predicted ksm_merging_pages
    zero_merged: int  # predicted ksm_zero_pages
    never_written: bool
    unwritten_ns: int
    written_pages: int = 0  # unmerge ranges: pages written during the observation

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def predicted_saving(self) -> int:
        return (self.merging_pages + self.zero_merged) * PAGE


@dataclass
class TargetAdvice:
    pid: int
    name: str
    resident_pages: int
    cold_pages: int
    duplicate_pages: int  # cold, non-zero, with a cold duplicate
    zero_pages: int  # cold, all-zero
    merging_pages: int
    zero_merged: int
    candidates: list[Range]
    unmerge: list[Range]
    ksm_stat: dict
    ksm_pages: int

    @property
    def predicted_saving(self) -> int:
        return sum(c.predicted_saving for c in self.candidates)


@dataclass
class Advice:
    targets: list[TargetAdvice]
    start_ns: int
    end_ns: int
    min_age_ns: int
    intervals: int
    settings: dict
    freed_bytes: int  # system-wide, when every candidate merges
    notes: list[str] = field(default_factory=list)


def _runs(addr: np.ndarray, mask: np.ndarray, vmas: list[tuple[int, int, bool]],
          join: int, density: float, min_pages: int, only_mergeable: bool = False
          ) -> list[tuple[int, int]]:
    """Runs of the pages ``addr[mask]`` inside one mapping each, joined over short
    gaps while dense enough; (start index, end index) into ``addr``."""
    out: list[tuple[int, int]] = []
    sel = np.flatnonzero(mask)
    if sel.size == 0:
        return out
    lo = np.asarray([v[0] for v in vmas], dtype=np.uint64)
    vma_of = np.searchsorted(lo, addr[sel], side="right") - 1
    cur: list[int] | None = None  # [first index, last index, worth, vma]
    for i, v in zip(sel.tolist(), vma_of.tolist(), strict=True):
        if only_mergeable and not vmas[v][2]:
            continue
        if cur is not None and cur[3] == v:
            gap = int(addr[i] - addr[cur[1]]) // PAGE - 1
            span = int(addr[i] - addr[cur[0]]) // PAGE + 1
            if gap <= join and (cur[2] + 1) / span >= density:
                cur[1], cur[2] = i, cur[2] + 1
                continue
        if cur is not None and cur[2] >= min_pages:
            out.append((cur[0], cur[1] + 1))
        cur = [i, i, 1, v]
    if cur is not None and cur[2] >= min_pages:
        out.append((cur[0], cur[1] + 1))
    return out


def _groups(targets: list[TargetPages], offered: list[np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """Content groups among the offered non-zero pages of all targets (hashes and
    sizes), and the number of offered zero pages."""
    hs = [t.hash[o & ~t.zero] for t, o in zip(targets, offered, strict=True)]
    allh = np.concatenate(hs) if hs else np.zeros(0, np.uint64)
    uniq, counts = np.unique(allh, return_counts=True)
    zeros = sum(int(np.count_nonzero(o & t.zero)) for t, o in zip(targets, offered,
                                                                   strict=True))
    return uniq, counts, zeros


def _worth(t: TargetPages, offered: np.ndarray, uniq: np.ndarray, counts: np.ndarray,
           zeros: int, use_zero: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(duplicate, zero that merges, either) among the offered pages of ``t``."""
    n = np.zeros(t.addr.size, dtype=np.int64)
    nz = offered & ~t.zero
    if uniq.size and nz.any():
        n[nz] = counts[np.searchsorted(uniq, t.hash[nz])]
    dup = nz & (n >= 2)
    zero = offered & t.zero
    zmerge = zero if (use_zero or zeros >= 2) else np.zeros_like(zero)
    return dup, zmerge, dup | zmerge


def advise(targets: list[TargetPages], *, start_ns: int, end_ns: int, intervals: int,
           settings: dict, min_age_ns: int | None = None, join_pages: int = JOIN_PAGES,
           min_density: float = MIN_DENSITY, min_pages: int = MIN_PAGES) -> Advice:
    """Candidates per target.  Duplicates count only among pages that will be offered:
    a cold page whose every twin lies outside the candidate ranges (left out as too
    scattered) has nothing to merge with, so ranges and groups are worked out again
    over the offered pages until they no longer change."""
    length = end_ns - start_ns
    min_age = min_age_ns if min_age_ns is not None else min(DEFAULT_MIN_AGE_NS, length // 2)
    use_zero = bool(settings.get("use_zero_pages", 0))
    mps = max(int(settings.get("max_page_sharing", 256)), 2)
    cold, unwritten = [], []
    for t in targets:
        u = end_ns - np.where(t.last_write_ns >= 0, t.last_write_ns, t.since_ns)
        unwritten.append(u)
        cold.append(u >= min_age)
    offered = [c.copy() for c in cold]
    runs: list[list[tuple[int, int]]] = [[] for _ in targets]
    for _ in range(8):
        uniq, counts, zeros = _groups(targets, offered)
        runs = [_runs(t.addr, _worth(t, o, uniq, counts, zeros, use_zero)[2], t.vmas,
                      join_pages, min_density, min_pages)
                for t, o in zip(targets, offered, strict=True)]
        new = []
        for t, c, rs in zip(targets, cold, runs, strict=True):
            inside = np.zeros(t.addr.size, dtype=bool)
            for a, b in rs:
                inside[a:b] = True
            new.append(c & inside)
        if all(np.array_equal(x, y) for x, y in zip(new, offered, strict=True)):
            break
        offered = new
    uniq, counts, zeros = _groups(targets, offered)
    dups = counts[counts >= 2]
    freed = int((dups - -(-dups // mps)).sum())  # one KSM page per max_page_sharing sharers
    if use_zero:
        freed += zeros
    elif zeros >= 2:
        freed += zeros - -(-zeros // mps)
    out = []
    for t, c, u, o, rs in zip(targets, cold, unwritten, offered, runs, strict=True):
        dup, zmerge, worth = _worth(t, o, uniq, counts, zeros, use_zero)
        cands = []
        for a, b in rs:
            w = slice(a, b)
            ww = np.flatnonzero(worth[w]) + a  # the pages it would merge
            if ww.size < min_pages:
                continue
            zr = int(np.count_nonzero(zmerge[w]))
            dp = int(np.count_nonzero(dup[w]))
            cands.append(Range(int(t.addr[a]), int(t.addr[b - 1]) + PAGE, int(ww.size), dp, zr,
                               dp + (0 if use_zero else zr), zr if use_zero else 0,
                               bool((t.last_write_ns[ww] < 0).all()), int(u[ww].min())))
        cands.sort(key=lambda r: (-r.predicted_saving, r.start))
        hot = (t.last_write_ns >= 0) & ~c
        unm = []
        for a, b in _runs(t.addr, hot, t.vmas, join_pages, HOT_DENSITY, min_pages,
                          only_mergeable=True):
            w = slice(a, b)
            unm.append(Range(int(t.addr[a]), int(t.addr[b - 1]) + PAGE,
                             int(np.count_nonzero(hot[w])), 0, 0, 0, 0, False,
                             int(u[w].min()), int(np.count_nonzero(hot[w]))))
        unm.sort(key=lambda r: (-r.written_pages, r.start))
        all_dup, _, _ = _worth(t, c, *_groups(targets, cold), use_zero)
        out.append(TargetAdvice(t.pid, t.name, int(t.addr.size), int(np.count_nonzero(c)),
                                int(np.count_nonzero(all_dup)),
                                int(np.count_nonzero(c & t.zero)),
                                sum(r.merging_pages for r in cands),
                                sum(r.zero_merged for r in cands), cands, unm, t.ksm_stat,
                                t.ksm_pages))
    return Advice(out, start_ns, end_ns, min_age, intervals, dict(settings), freed * PAGE)


# -- output ------------------------------------------------------------------------


def range_dict(r: Range, *, hot: bool = False) -> dict:
    d = {"start": r.start, "end": r.end, "size": r.size, "unwritten_ns": r.unwritten_ns,
         "never_written": r.never_written}
    if hot:
        d["written_pages"] = r.written_pages
        return d
    d.update({"pages": r.pages, "duplicate_pages": r.duplicate_pages,
              "zero_pages": r.zero_pages, "predicted_merging_pages": r.merging_pages,
              "predicted_zero_pages": r.zero_merged, "predicted_saving": r.predicted_saving,
              "read_bytes": None})
    return d


def target_dict(t: TargetAdvice, length_ns: int, min_age_ns: int) -> dict:
    return {
        "pid": t.pid, "name": t.name, "resident_bytes": t.resident_pages * PAGE,
        "mapped": t.resident_pages * PAGE, "length_ns": length_ns, "min_age_ns": min_age_ns,
        "cold_pages": t.cold_pages, "duplicate_pages": t.duplicate_pages,
        "zero_pages": t.zero_pages,
        "predicted": {"saving_bytes": t.predicted_saving, "merging_pages": t.merging_pages,
                      "zero_pages": t.zero_merged},
        "candidate_bytes": sum(c.size for c in t.candidates),
        "candidates": [range_dict(c) for c in t.candidates],
        "unmerge": [range_dict(r, hot=True) for r in t.unmerge],
        "ksm_stat": t.ksm_stat, "ksm_pages": None if t.ksm_pages < 0 else t.ksm_pages,
    }


def to_json(adv: Advice, record: str | None = None) -> dict:
    length = adv.end_ns - adv.start_ns
    return {"record": record, "method": "ksm-advise", "length_ns": length,
            "min_age_ns": adv.min_age_ns, "intervals": adv.intervals, "ksm": adv.settings,
            "freed_bytes": adv.freed_bytes, "notes": adv.notes,
            "targets": [target_dict(t, length, adv.min_age_ns) for t in adv.targets]}


def _age(ns: int, never: bool) -> str:
    return fmt_duration_ns(ns) + (" (never)" if never else "")


def to_text(adv: Advice, header: list[str] | None = None, top: int = 20) -> str:
    from udamon.report.common import render_table

    lines = list(header or [])
    s = adv.settings
    lines.append(f"observed {fmt_duration_ns(adv.end_ns - adv.start_ns)} ({adv.intervals} "
                 "write scans: every page write-protected, its last write known within one "
                 f"interval); cold = not written for >= {fmt_duration_ns(adv.min_age_ns)}")
    lines.append(f"KSM now: run={s.get('run', '?')} use_zero_pages={s.get('use_zero_pages', '?')}"
                 f" max_page_sharing={s.get('max_page_sharing', '?')}; predicted saving = pages "
                 "KSM would merge (ksm_merging_pages) + pages it would map to the zero page "
                 "(ksm_zero_pages), x page size")
    lines += [f"note: {n}" for n in adv.notes]
    for t in adv.targets:
        lines.append(f"\ntarget {t.pid} {t.name}: {fmt_size(t.resident_pages * PAGE)} resident in "
                     f"anonymous mappings, {fmt_size(t.cold_pages * PAGE)} cold; "
                     f"{t.duplicate_pages} cold pages have a duplicate, {t.zero_pages} are zero")
        lines.append(f"  predicted saving {fmt_size(t.predicted_saving)} "
                     f"({t.merging_pages} pages merged, {t.zero_merged} to the zero page) in "
                     f"{len(t.candidates)} range(s)")
        if t.candidates:
            table = [["start", "end", "size", "saving", "duplicates", "zero",
                      "unwritten for"]]
            for c in t.candidates[:top]:
                table.append([f"{c.start:#x}", f"{c.end:#x}", fmt_size(c.size),
                              fmt_size(c.predicted_saving), str(c.duplicate_pages),
                              str(c.zero_pages), _age(c.unwritten_ns, c.never_written)])
            lines += render_table(table, left=2, indent="    ")
            if len(t.candidates) > top:
                lines.append(f"    ... {len(t.candidates) - top} more (--top N)")
        if t.unmerge:
            lines.append("  write-hot ranges already offered to KSM (MADV_UNMERGEABLE would "
                         "stop merging and breaking them):")
            table = [["start", "end", "size", "written pages"]]
            for r in t.unmerge[:top]:
                table.append([f"{r.start:#x}", f"{r.end:#x}", fmt_size(r.size),
                              str(r.written_pages)])
            lines += render_table(table, left=2, indent="    ")
        st = t.ksm_stat
        if st:
            lines.append(f"  KSM now: ksm_merging_pages {st.get('ksm_merging_pages', '?')}, "
                         f"ksm_zero_pages {st.get('ksm_zero_pages', '?')}")
    lines.append(f"\nfreed system-wide if every candidate merges: ~{fmt_size(adv.freed_bytes)} "
                 "(one copy of each content stays)")
    return "\n".join(lines) + "\n"


def apply_text(ap: dict) -> str:
    """What --apply did (or, dry, would do), and predicted against actual."""
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
            after = t["ksm_stat_after"]
            lines.append(f"  pid {t['pid']}: predicted saving {fmt_size(pred)}, actual "
                         f"{fmt_size(act)}{ratio} (ksm_merging_pages "
                         f"{after.get('ksm_merging_pages', '?')}, ksm_zero_pages "
                         f"{after.get('ksm_zero_pages', '?')})")
    if not ap["dry_run"]:
        if ap.get("note"):
            lines.append(f"note: {ap['note']}")
        else:
            lines.append(f"waited {fmt_duration_ns(ap['waited_ns'])} for KSM"
                         + ("; KSM's settings restored" if ap["ksm_run"] else ""))
    return "\n".join(lines) + "\n"


# -- a record of udamon ksm-advise -------------------------------------------------


def is_advice_record(rec) -> bool:
    est = rec.header.get("estimator")
    return isinstance(est, dict) and est.get("kind") == "ksm-advise"


def _range(d: dict, hot: bool = False) -> Range:
    if hot:
        return Range(int(d["start"]), int(d["end"]), int(d["written_pages"]), 0, 0, 0, 0,
                     bool(d.get("never_written")), int(d["unwritten_ns"]),
                     int(d["written_pages"]))
    return Range(int(d["start"]), int(d["end"]), int(d["pages"]), int(d["duplicate_pages"]),
                 int(d["zero_pages"]), int(d["predicted_merging_pages"]),
                 int(d["predicted_zero_pages"]), bool(d["never_written"]),
                 int(d["unwritten_ns"]))


def advice_from_record(rec, pid: int | None = None) -> tuple[Advice, dict[int, dict]]:
    """The advice a record of ``udamon ksm-advise -o`` holds, and per target what
    --apply did (when it ran)."""
    from udamon.errors import InputError

    est = rec.header["estimator"]
    targets, applied = [], {}
    end = 0
    for s in rec.snapshots:
        d = (s.extra or {}).get("ksm")
        if d is None or (pid is not None and s.pid != pid):
            continue
        end = max(end, s.time_ns)
        try:
            cands = [_range(c) for c in d["candidates"]]
            unm = [_range(c, hot=True) for c in d.get("unmerge", [])]
            p = d["predicted"]
            targets.append(TargetAdvice(s.pid, str(d.get("name", "")),
                                        int(d["resident_bytes"]) // PAGE, int(d["cold_pages"]),
                                        int(d["duplicate_pages"]), int(d["zero_pages"]),
                                        int(p["merging_pages"]), int(p["zero_pages"]), cands, unm,
                                        dict(d.get("ksm_stat") or {}),
                                        -1 if d.get("ksm_pages") is None else int(d["ksm_pages"])))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{rec.path}: the KSM advice of pid {s.pid} is malformed "
                             f"({type(e).__name__}: {e})") from None
        if "apply" in d:
            applied[s.pid] = d["apply"]
    length = int(est.get("length_ns", 0))
    adv = Advice(targets, end - length, end, int(est.get("min_age_ns", 0)),
                 int(est.get("intervals", 0)), dict(est.get("ksm") or {}),
                 int(est.get("freed_bytes", 0)), list(est.get("notes") or []))
    return adv, applied
