"""Read the record files of damo (DAMON's user-space tool, 3.4) as udamon records.

So every ``udamon report`` works on kernel DAMON data recorded anywhere
(``udamon report KIND -i damon.data``), and ``udamon import`` writes a udamon
record of it.  The formats damo 3.4.3 writes (``damo record --output_type``,
damo's ``_damo_records.py``), recognised by their content, not their name:

* ``json_compressed`` (the default): zlib-compressed JSON, a list of ``DamonRecord``
  key-value pairs (kdamond_idx, context_idx, intervals, scheme_idx, target_id,
  scheme_filters, snapshots [start_time, end_time, regions [start, end,
  nr_accesses {samples, percent}, age {usec, aggr_intervals}, probe_hits,
  sz_filter_passed], total_bytes, damos_stats, sample_interval_us], data_source);
* ``json``: the same, not compressed;
* ``perf_script``: text, one ``damon:damon_aggregated`` (or
  ``damon:damos_before_apply``, with --schemes_target_regions) line per region,
  as ``perf script`` prints the kernel's tracepoints and as damo writes them;
* ``perf_data``: ``perf record``'s binary perf.data, what ``damo record`` keeps
  before it converts; udamon reads it through ``perf script`` (perf needed).

Numbers may be raw (what damo writes) or damo's human forms ("5 ms", "4 KiB").
``damo record`` also writes ``FILE.kdamonds`` (the kdamonds it ran); when it is
there the intervals, the region bounds and the targets' pids come from it.

Mapping: one udamon target per damo record (per DamonRecord: a target, or a
scheme's tried regions); its pid is the target's pid from ``FILE.kdamonds`` when
known, else the ``target_id`` when it is a pid-sized number (udamon's own export
writes the pid there), else its position (0, 1, ...; the kernel's tracepoints
give the target's index, older kernels a pointer).  Probes are named ``probe0``,
``probe1``, ... by position (damo keeps no probe names).  Snapshots: start/end
times in ns as recorded (perf's clock, or the wall clock of damo's snapshot
mode), ``nr_accesses`` in samples (from ``percent`` when only that is there),
``age`` in aggregation intervals (from ``usec``).  The record's coverage is
``controlled``: kernel DAMON samples one page per region per sampling interval.
Dropped: ``sz_filter_passed``, DAMOS stats, scheme filters, damo's fake
snapshots (a 0-0 region with -1 counts) and snapshots without regions.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Iterable

import numpy as np

from udamon import __version__
from udamon.core.attrs import Attrs, IntervalsGoal
from udamon.core.monitor import Snapshot
from udamon.errors import InputError, RuntimeFailure
from udamon.probes.probe import Probe
from udamon.record.format import FORMAT_NAME, FORMAT_VERSION
from udamon.record.reader import Record

DAMO_VERSION = "3.4.3"
KINDS = ("json_compressed", "json", "perf_script", "perf_data")
_TRACE_WORDS = (b"damon:damon_aggregated", b"damon:damos_before_apply",
                b"damon_aggregated:", b"damos_before_apply:")
_PID_MAX = (1 << 22)  # PID_MAX_LIMIT: a larger target id is not a pid


def sniff(path: str) -> str | None:
    """Which damo record format the file holds, or None (not a damo record)."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    if head.startswith(b"PERFILE2"):
        return "perf_data"
    if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
        return "json_compressed"  # a zlib stream header (RFC 1950)
    text = head.lstrip()
    if text.startswith(b"{"):
        return None  # a udamon record (whose notes may name the tracepoints)
    if text.startswith(b"["):
        return "json"
    if any(w in head for w in _TRACE_WORDS):
        return "perf_script"
    return None


# ---------------------------------------------------------------- numbers in damo's forms

_UNITS_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
             "h": 3_600_000_000_000, "d": 86_400_000_000_000}
_UNITS_B = {"B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20,
            "G": 1 << 30, "GiB": 1 << 30, "T": 1 << 40, "TiB": 1 << 40}


class _Bad(Exception):
    pass


I64 = (1 << 63) - 1  # counts, times and intervals are held as signed 64-bit numbers


def _number(v, what: str) -> float:
    if isinstance(v, bool):
        raise _Bad(f"{what} is not a number: {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _Bad(f"{what} is not a finite number: {v!r}")
        return v
    if isinstance(v, str):
        t = v.replace(",", "").strip()
        if t == "max":
            return 2**64 - 1
        try:
            return int(t)
        except ValueError:
            pass
        try:
            f = float(t)
        except ValueError:
            pass
        else:
            if math.isfinite(f):
                return f
    raise _Bad(f"{what} is not a number: {v!r}")


def _count(v, what: str, lo: int = 0, hi: int = I64) -> int:
    """A whole number within [lo, hi] (a count, an index), from any of damo's forms."""
    n = _number(v, what)
    if not lo <= n <= hi:
        raise _Bad(f"{what} {v!r} is out of range ({lo}..{hi})")
    return int(n)


def _index(v, what: str) -> int:
    """kdamond_idx / context_idx: a small whole number, 0 when absent."""
    return 0 if v is None else _count(v, what, hi=1 << 20)


def _with_unit(v, units: dict[str, int], scale: int, what: str) -> int:
    """A raw number (in the unit of ``scale``) or damo's '<n> <unit>' forms; within
    +-2^63 units of ``scale`` -- times in ns -- and of bytes (2^64 for addresses)."""
    hi = (1 << 64) if units is _UNITS_B else I64 // scale
    try:
        n = _number(v, what)
    except _Bad:
        if not isinstance(v, str):
            raise
        parts = re.findall(r"([-+]?[0-9.,]+)\s*([A-Za-z]+)", v)
        if not parts:
            raise _Bad(f"{what}: cannot read {v!r}") from None
        total = 0.0
        for num, unit in parts:
            if unit not in units:
                raise _Bad(f"{what}: unknown unit {unit!r} in {v!r}") from None
            try:
                total += float(num.replace(",", "")) * units[unit]
            except ValueError:
                raise _Bad(f"{what}: cannot read {v!r}") from None
        n = total / scale
    if not (math.isfinite(n) and -hi <= n <= hi):
        raise _Bad(f"{what} {v!r} is out of range")
    return int(round(n))


def _ns(v, what):
    return _with_unit(v, _UNITS_NS, 1, what)


def _us(v, what):
    return _with_unit(v, _UNITS_NS, 1000, what)


def _bytes(v, what):
    return _with_unit(v, _UNITS_B, 1, what)


# ---------------------------------------------------------------- the sidecar kdamonds file


def _sidecar(path: str) -> list[dict] | None:
    side = f"{path}.kdamonds"
    try:
        with open(side) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, list) else None


def _ctx(kdamonds: list[dict] | None, kd: int, ctx: int) -> dict | None:
    try:
        c = kdamonds[kd]["contexts"][ctx]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None
    return c if isinstance(c, dict) else None


# ---------------------------------------------------------------- damo json -> Record


def _attrs(intervals: dict | None, ctx: dict | None) -> tuple[Attrs, list[str]]:
    notes: list[str] = []
    iv = intervals or (ctx or {}).get("intervals")
    if not isinstance(iv, dict):
        return Attrs(), ["the damo record has no monitoring intervals: DAMON's defaults "
                         "(5 ms, 100 ms, 1 s) assumed"]
    sample = _us(iv.get("sample_us", 5000), "sample_us")
    aggr = _us(iv.get("aggr_us", 100000), "aggr_us")
    update = _us(iv.get("ops_update_us", 1000000), "ops_update_us")
    goal = IntervalsGoal()
    g = iv.get("intervals_goal")
    if isinstance(g, dict):
        raw = g.get("access_bp", 0)
        if isinstance(raw, str) and raw.strip().endswith("%"):  # damo's "4 %" form
            bp = _number(raw.strip()[:-1], "access_bp") * 100
        elif isinstance(raw, str) and raw.strip().endswith("bp"):
            bp = _number(raw.strip()[:-2], "access_bp")
        else:
            bp = _number(raw, "access_bp")
        goal = IntervalsGoal(_count(bp, "access_bp", hi=10_000 * 100),
                             _count(g.get("aggrs", 0), "aggrs", hi=1 << 31),
                             _us(g.get("min_sample_us", 0), "min_sample_us"),
                             _us(g.get("max_sample_us", 0), "max_sample_us"))
    lo, hi = 10, 1000
    nr = (ctx or {}).get("nr_regions")
    if isinstance(nr, dict):
        lo = _count(nr.get("min", lo), "nr_regions min", hi=1 << 31)
        hi = _count(nr.get("max", hi), "nr_regions max", hi=1 << 31)
    sample = max(1, sample)
    aggr = max(sample, aggr - aggr % sample)
    try:
        a = Attrs(sample, aggr, max(update, aggr), max(3, lo), max(hi, max(3, lo)), goal)
        a.validate()
    except ValueError as e:
        notes.append(f"damo's intervals or goal are not valid for udamon ({e}): tuning off")
        a = Attrs(sample, aggr, max(update, aggr), max(3, lo), max(hi, max(3, lo)))
    return a, notes


def _region_arrays(regions: list, where: str, sample_us: int, aggr_us: int, nr_probes: int):
    n = len(regions)
    start = np.empty(n, dtype=np.uint64)
    end = np.empty(n, dtype=np.uint64)
    acc = np.empty(n, dtype=np.int64)
    age = np.empty(n, dtype=np.int64)
    hits = np.zeros((nr_probes, n), dtype=np.int64)
    samples = max(1, aggr_us // max(sample_us, 1))
    for i, r in enumerate(regions):
        w = f"{where} region {i}"
        if not isinstance(r, dict):
            raise _Bad(f"{w}: not an object")
        s, e = _bytes(r.get("start"), f"{w} start"), _bytes(r.get("end"), f"{w} end")
        if not 0 <= s < e < 1 << 64:
            raise _Bad(f"{w}: end {e:#x} must be above start {s:#x}")
        na = r.get("nr_accesses")
        if isinstance(na, dict):
            if na.get("samples") is not None:
                a = _count(na["samples"], f"{w} nr_accesses")
            elif na.get("percent") is not None:
                a = _count(_number(na["percent"], f"{w} nr_accesses percent") * samples / 100,
                           f"{w} nr_accesses")
            else:
                raise _Bad(f"{w}: nr_accesses has neither samples nor percent")
        else:
            a = _count(na, f"{w} nr_accesses")
        ag = r.get("age")
        if isinstance(ag, dict):
            if ag.get("aggr_intervals") is not None:
                g = _count(ag["aggr_intervals"], f"{w} age")
            elif ag.get("usec") is not None:
                g = _count(_us(ag["usec"], f"{w} age usec") // max(aggr_us, 1), f"{w} age")
            else:
                raise _Bad(f"{w}: age has neither aggr_intervals nor usec")
        else:
            g = _count(ag if ag is not None else 0, f"{w} age")
        start[i], end[i], acc[i], age[i] = s, e, a, g
        ph = r.get("probe_hits") or []
        if not isinstance(ph, list):
            raise _Bad(f"{w}: probe_hits must be a list")
        for k, h in enumerate(ph[:nr_probes]):
            hits[k, i] = _count(h, f"{w} probe hit")
    order = np.argsort(start, kind="stable")
    start, end, acc, age, hits = start[order], end[order], acc[order], age[order], hits[:, order]
    if n > 1 and np.any(start[1:] < end[:-1]):
        i = int(np.flatnonzero(start[1:] < end[:-1])[0]) + 1
        raise _Bad(f"{where}: region at {int(start[i]):#x} overlaps the one before it")
    return start, end, acc, age, hits


def _is_fake(regions: list) -> bool:
    if len(regions) != 1 or not isinstance(regions[0], dict):
        return False
    r = regions[0]
    try:
        na, ag = r.get("nr_accesses", {}), r.get("age", {})
        return (_bytes(r["start"], "") == 0 and _bytes(r["end"], "") == 0
                and isinstance(na, dict) and _number(na.get("samples"), "") == -1
                and isinstance(ag, dict) and _number(ag.get("aggr_intervals"), "") == -1)
    except (_Bad, KeyError, TypeError):
        return False


def _merged(records: list) -> list:
    """damo's snapshot mode writes one record per snapshot; like damo's own reader,
    records of the same kdamond, context, scheme and target are one."""
    out: dict[tuple, dict] = {}
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("snapshots"), list):
            raise _Bad("a damo record must be an object with 'snapshots'")
        key = tuple(json.dumps(rec.get(k), sort_keys=True) for k in
                    ("kdamond_idx", "context_idx", "scheme_idx", "target_id", "intervals"))
        if key in out:
            out[key] = {**out[key], "snapshots": out[key]["snapshots"] + rec["snapshots"]}
        else:
            out[key] = rec
    for rec in out.values():
        rec["snapshots"] = sorted(rec["snapshots"], key=lambda s: _ns(
            s.get("end_time", 0) if isinstance(s, dict) else 0, "end_time"))
    return list(out.values())


def records_to_record(path: str, kind: str, records: list, *,
                      kdamonds: list[dict] | None = None, notes: Iterable[str] = ()) -> Record:
    """damo ``DamonRecord`` key-value pairs -> a udamon Record (see the module doc)."""
    if not isinstance(records, list):
        raise _Bad("not a list of damo records")
    if not records:
        raise _Bad("holds no damo records")
    records = _merged(records)
    all_notes = list(notes)
    nr_probes = 0
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("snapshots"), list):
            raise _Bad("a damo record must be an object with 'snapshots'")
        for s in rec["snapshots"]:
            regions = s.get("regions") if isinstance(s, dict) else None
            for r in regions if isinstance(regions, list) else []:
                if isinstance(r, dict) and isinstance(r.get("probe_hits"), list):
                    nr_probes = max(nr_probes, len(r["probe_hits"]))
    first = records[0]
    ctx0 = _ctx(kdamonds, _index(first.get("kdamond_idx"), "kdamond_idx"),
                _index(first.get("context_idx"), "context_idx"))
    attrs, n = _attrs(first.get("intervals"), ctx0)
    all_notes += n
    probes = [Probe(f"probe{i}") for i in range(nr_probes)]
    targets: list[dict] = []
    snaps: list[Snapshot] = []
    used: set[int] = set()
    ns_fix = False
    for ri, rec in enumerate(records):
        kd = _index(rec.get("kdamond_idx"), "kdamond_idx")
        ci = _index(rec.get("context_idx"), "context_idx")
        ctx = _ctx(kdamonds, kd, ci)
        tid = rec.get("target_id")
        pid = None
        if isinstance(tid, int) and ctx is not None:
            ts = ctx.get("targets")
            if isinstance(ts, list) and 0 <= tid < len(ts) and isinstance(ts[tid], dict):
                p = ts[tid].get("pid")
                if isinstance(p, int) and 0 < p < _PID_MAX:
                    pid = p
        if pid is None and tid is None and ctx is not None:
            ts = ctx.get("targets")  # snapshot mode: a scheme's regions of its one target
            if isinstance(ts, list) and len(ts) == 1 and isinstance(ts[0], dict):
                p = ts[0].get("pid")
                if isinstance(p, int) and 0 < p < _PID_MAX:
                    pid = p
        if pid is None and isinstance(tid, int) and 0 <= tid < _PID_MAX:
            pid = tid
        if pid is None or pid in used:
            pid = next(i for i in range(ri, ri + len(records) + len(used) + 1) if i not in used)
        used.add(pid)
        name = f"damo target {tid}" if tid is not None else f"damo record {ri}"
        if rec.get("scheme_idx") is not None:
            name += f" (scheme {rec['scheme_idx']} tried regions)"
        targets.append({"pid": pid, "name": name, "ranges": [], "follows_vmas": False})
        last = None
        for si, s in enumerate(rec["snapshots"]):
            where = f"{path}: record {ri} snapshot {si}"
            if not isinstance(s, dict):
                raise _Bad(f"{where}: not an object")
            regions = s.get("regions") or []
            if not isinstance(regions, list):
                raise _Bad(f"{where}: regions must be a list")
            if not regions or _is_fake(regions):
                continue
            t1 = _ns(s.get("end_time"), f"{where} end_time")
            t0 = s.get("start_time")
            t0 = _ns(t0, f"{where} start_time") if t0 is not None else t1 - attrs.aggr_us * 1000
            if not -I64 <= t0 <= t1:
                raise _Bad(f"{where}: start_time {t0} must be at most end_time {t1} and fit "
                           "a signed 64-bit clock")
            su = s.get("sample_interval_us")
            sample_us = _us(su, f"{where} sample_interval_us") if su else attrs.sample_us
            if sample_us * 1000 > t1 - t0 and sample_us % 1000 == 0:
                # damo 3.4.3 writes this field in nanoseconds when it writes raw numbers
                # (format_time_us_exact), though it reads it back as microseconds
                sample_us //= 1000
                if not ns_fix:
                    ns_fix = True
                    all_notes.append("damo's sample_interval_us were nanoseconds (damo 3.4.3 "
                                     "writes them so): read as such")
            st, en, acc, age, hits = _region_arrays(regions, where, sample_us,
                                                    attrs.aggr_us, nr_probes)
            if last is not None and t1 <= last:
                all_notes.append(f"record {ri}: snapshot {si} is not after the one before "
                                 "it; left out")
                continue
            last = t1
            snaps.append(Snapshot(int(t1), int(t0), pid, max(1, int(sample_us)), st, en, acc,
                                  age, {p.name: hits[i] for i, p in enumerate(probes)}))
    if not snaps:
        raise _Bad("holds no snapshot with regions")
    snaps.sort(key=lambda s: (s.time_ns, s.pid))
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "attrs": attrs.to_dict(),
        "primitive": "damo", "coverage": "controlled", "filters": [],
        "probes": [p.to_dict() for p in probes], "targets": targets,
        "udamon_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input": os.path.abspath(path), "input_format": f"damo-{kind}",
        "notes": all_notes + [f"read from damo's {kind} record"
                              + (" and its .kdamonds file" if kdamonds is not None else "")],
    }
    end = {"reason": "input-exhausted", "dropped_reports": 0, "lost_samples": 0,
           "snapshots": len(snaps)}
    return Record(path, header, attrs, [], probes, snaps, end)


# ---------------------------------------------------------------- perf script text -> records

_LINE = re.compile(r"\s(\d+\.\d+):\s+(?:damon:)?(damon_aggregated|damos_before_apply|"
                   r"damon_region_aggregated|damon_monitor_intervals_tune):\s*(.*)$")
# damon_aggregated (age missing in early kernels) and damon_region_aggregated (probe_hits:
# __print_hex, bytes in hex separated by spaces)
_AGG = re.compile(r"target_id=(\d+)\s+nr_regions=(\d+)\s+(\d+)-(\d+):\s+(\d+)(?:\s+(\d+))?"
                  r"(?:\s+probe_hits=([0-9a-fA-F ]*))?")
_APPLY = re.compile(r"ctx_idx=(\d+)\s+scheme_idx=(\d+)\s+target_idx=(\d+)\s+nr_regions=(\d+)\s+"
                    r"(\d+)-(\d+):\s+(\d+)\s+(\d+)")


def parse_trace_text(text: str, where: str) -> tuple[list[dict], list[str]]:
    """perf script / damo perf_script text -> damo record kvpairs (damo's own grouping:
    a target's snapshot is complete with nr_regions regions; region_aggregated lines,
    which carry probe hits, are preferred when both events are there)."""
    has_region = "damon_region_aggregated" in text
    records: dict[tuple, dict] = {}
    open_snap: dict[tuple, dict] = {}
    sample_us = None
    notes: list[str] = []
    bad = 0
    for line in text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        sec, _, frac = m.group(1).partition(".")
        t = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
        ev, rest = m.group(2), m.group(3)
        if ev == "damon_monitor_intervals_tune":
            mm = re.search(r"sample_us=(\d+)", rest)
            if mm:
                sample_us = int(mm.group(1))
            continue
        if ev == "damon_aggregated" and has_region:
            continue
        if ev == "damos_before_apply":
            mm = _APPLY.match(rest)
            if mm is None:
                bad += 1
                continue
            key = ("scheme", int(mm.group(2)), int(mm.group(3)))
            n, s, e, acc, age, ph = (int(mm.group(4)), int(mm.group(5)), int(mm.group(6)),
                                     int(mm.group(7)), int(mm.group(8)), None)
        else:
            mm = _AGG.match(rest)
            if mm is None:
                bad += 1
                continue
            key = ("target", int(mm.group(1)))
            n, s, e, acc = int(mm.group(2)), int(mm.group(3)), int(mm.group(4)), int(mm.group(5))
            age = int(mm.group(6)) if mm.group(6) is not None else 0
            ph = mm.group(7)
        if key not in records:
            records[key] = {"kdamond_idx": 0, "context_idx": 0, "intervals": None,
                            "scheme_idx": key[1] if key[0] == "scheme" else None,
                            "target_id": key[-1] if key[0] == "target" else key[2],
                            "scheme_filters": [], "snapshots": []}
        snap = open_snap.get(key)
        if snap is None or len(snap["regions"]) >= snap["_n"]:
            prev = records[key]["snapshots"][-1]["end_time"] if records[key]["snapshots"] else None
            snap = {"start_time": prev, "end_time": t, "regions": [], "_n": n,
                    "sample_interval_us": sample_us}
            records[key]["snapshots"].append(snap)
            open_snap[key] = snap
        region = {"start": s, "end": e, "nr_accesses": {"samples": acc, "percent": None},
                  "age": {"usec": None, "aggr_intervals": age}}
        if ph:
            hexs = ph.replace(" ", "")
            region["probe_hits"] = [int(hexs[i:i + 2], 16) for i in range(0, len(hexs), 2)]
        snap["regions"].append(region)
    out = []
    for rec in records.values():
        snaps = rec["snapshots"]
        broken = [s for s in snaps if len(s["regions"]) != s.pop("_n")]
        if broken:
            notes.append(f"{len(broken)} incomplete snapshot(s) of target {rec['target_id']} "
                         "left out (regions missing: lost trace events?)")
        rec["snapshots"] = [s for s in snaps if s not in broken]
        if len(rec["snapshots"]) > 1 and rec["snapshots"][0]["start_time"] is None:
            ends = [s["end_time"] for s in rec["snapshots"]]
            rec["snapshots"][0]["start_time"] = ends[0] - (ends[-1] - ends[0]) // (len(ends) - 1)
        out.append(rec)
    if bad:
        notes.append(f"{bad} DAMON trace line(s) of an unknown layout skipped")
    if not out:
        raise _Bad(f"{where}: no DAMON tracepoint lines (damon:damon_aggregated)")
    return out, notes


def _infer_intervals(records: list[dict]) -> tuple[dict, str]:
    """perf script text has no intervals: the aggregation interval is the median time
    between snapshots, with DAMON's 20 samples per aggregation (more when counts say)."""
    gaps, most = [], 0
    for rec in records:
        ends = [s["end_time"] for s in rec["snapshots"]]
        gaps += [b - a for a, b in zip(ends[:-1], ends[1:], strict=False)]
        for s in rec["snapshots"]:
            most = max(most, *(r["nr_accesses"]["samples"] for r in s["regions"]))
    aggr_us = int(np.median(gaps) / 1000) if gaps else 100_000
    samples = max(20, most)
    sample_us = max(1, aggr_us // samples)
    iv = {"sample_us": sample_us, "aggr_us": sample_us * samples,
          "ops_update_us": max(1_000_000, sample_us * samples)}
    return iv, (f"perf script text holds no monitoring intervals: aggregation "
                f"{iv['aggr_us']} us taken from the snapshot spacing, sampling "
                f"{sample_us} us ({samples} per aggregation) assumed")


# ---------------------------------------------------------------- entry point


def read_damo(path: str, kind: str | None = None) -> Record:
    """Read a damo record file (any of KINDS) as a udamon Record; InputError (exit 2)
    names what is wrong."""
    kind = kind or sniff(path)
    if kind not in KINDS:
        raise InputError(f"{path}: not a damo record file")
    kdamonds = _sidecar(path)
    try:
        notes: list[str] = []
        if kind in ("json", "json_compressed"):
            with open(path, "rb") as f:
                data = f.read()
            if kind == "json_compressed":
                try:
                    data = zlib.decompress(data)
                except zlib.error as e:
                    raise _Bad(f"compressed data is corrupted ({e})") from None
            try:
                records = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise _Bad(f"not valid JSON ({e})") from None
            if isinstance(records, dict) and "damon_records" in records:
                records = records["damon_records"].get("record_list", [])
        else:
            text = _perf_script(path) if kind == "perf_data" else _text(path)
            records, notes = parse_trace_text(text, path)
            if kdamonds is None:
                iv, note = _infer_intervals(records)
                notes.append(note)
                for r in records:
                    r["intervals"] = iv
        return records_to_record(path, kind, records, kdamonds=kdamonds, notes=notes)
    except _Bad as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(path) else f"{path}: damo {kind} record: {msg}"
                         ) from None


def _text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def _perf_script(path: str) -> str:
    perf = shutil.which("perf")
    if perf is None:
        raise RuntimeFailure(f"{path} is a perf.data file (damo record's raw trace): reading "
                             "it needs perf ('perf script'), which is not installed")
    p = subprocess.run([perf, "script", "--force", "-i", path], capture_output=True,
                       timeout=600)
    if p.returncode != 0:  # perf runs, the file is what it cannot read: bad input
        last = (p.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise InputError(f"{path}: a perf.data file 'perf script' cannot read: {last}")
    return p.stdout.decode(errors="replace")
