"""A snapshot as a record line and back: the JSON both the writer and the reader
use (DESIGN.md, "Record file"), so the two cannot disagree on a key.

A region's ``nodes`` ({"<node>": pages}) is the on-disk form of the snapshot's
``page_nodes`` matrix (regions x nodes, integer pages).
"""

from __future__ import annotations

import functools
import json

import numpy as np

from udamon.core.monitor import Snapshot
from udamon.record.format import ESTIMATE_KEYS, SNAPSHOT_KEYS


class BadLine(Exception):
    """A record line that is not what the format says (message: ``FILE:LINE: why``)."""


def _need(d: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise BadLine(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def _int(v, what: str, where: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    """An integer field within [lo, hi] (counts are held as signed 64-bit numbers)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise BadLine(f"{where}: {what} must be an integer >= {lo}, got {v!r}")
    if v > hi:
        raise BadLine(f"{where}: {what} {v} is too large (at most {hi})")
    return v


class NamesWritten:
    """What a record already says of each target's names, so that a snapshot line
    carries its target's mapping names only when they differ from the last ones
    written, and only the thread names that are new or changed (the header's
    ``targets[].threads`` count as written)."""

    def __init__(self, header: dict | None = None):
        self._names: dict[int, list] = {}
        self._threads: dict[int, dict[int, str]] = {}
        for t in (header or {}).get("targets", []):
            if isinstance(t.get("threads"), dict):
                self._threads[int(t["pid"])] = {int(k): v for k, v in t["threads"].items()}

    def delta(self, snap: Snapshot) -> tuple[list | None, dict[int, str] | None]:
        """(the names table to write or None, the thread names to write or None)."""
        names = None
        if snap.names is not None:
            prev = self._names.get(snap.pid)
            if prev is not snap.names and prev != snap.names:
                names = snap.names
            self._names[snap.pid] = snap.names
        threads = None
        if snap.threads:
            known = self._threads.setdefault(snap.pid, {})
            new = {k: v for k, v in snap.threads.items() if known.get(k) != v}
            if new:
                known.update(new)
                threads = new
        return names, threads


def snapshot_to_json(snap: Snapshot, written: NamesWritten | None = None) -> dict:
    """The snapshot's record line (a JSON object).  ``written``: what the record said
    of names before (a writer's); without it the whole names tables are written."""
    names = list(snap.probe_hits)
    hits = [snap.probe_hits[n].tolist() for n in names]
    wp = snap.written_pages.tolist() if snap.written_pages is not None else None
    nodes = None
    if snap.page_nodes is not None:
        pn = snap.page_nodes
        nodes = [{str(n): int(pn[i, n]) for n in np.flatnonzero(pn[i]).tolist()}
                 for i in range(pn.shape[0])]
    regions = []
    for i, (s, e, a, g) in enumerate(zip(snap.start.tolist(), snap.end.tolist(),
                                          snap.nr_accesses.tolist(), snap.age.tolist(),
                                          strict=True)):
        reg = {"start": s, "end": e, "nr_accesses": a, "age": g,
               "probes": {n: h[i] for n, h in zip(names, hits, strict=True)}}
        if nodes is not None:
            reg["nodes"] = nodes[i]
        if wp is not None and wp[i]:
            reg["written_pages"] = wp[i]
        regions.append(reg)
    out = {"time_ns": snap.time_ns, "pid": snap.pid, "sample_us": snap.sample_us,
           "aggr_us": snap.aggr_us, "nr_reports": snap.nr_reports,
           "nr_passed": snap.nr_passed, "regions": regions}
    if snap.mapped is not None:
        out["mapped"] = [[int(a), int(b)] for a, b in snap.mapped]
    if snap.mergeable is not None:
        out["mergeable"] = [[int(a), int(b)] for a, b in snap.mergeable]
    if snap.numa is not None:
        out["numa"] = snap.numa
    names, threads = (written.delta(snap) if written is not None
                      else (snap.names, snap.threads or None))
    if names is not None:
        out["names"] = [[int(a), int(b), str(n)] for a, b, n in names]
    if threads:
        out["threads"] = {str(k): str(v) for k, v in sorted(threads.items())}
    if snap.extra:
        out.update(snap.extra)
    return out


_ENC = json.JSONEncoder(separators=(",", ":"))
# the keys snapshot_to_json writes itself: an estimator's extra key among them replaces
# that key's value in place, which only the dict path reproduces
_OWN_KEYS = frozenset(("time_ns", "pid", "sample_us", "aggr_us", "nr_reports", "nr_passed",
                       "regions", "mapped", "mergeable", "numa", "names", "threads"))


@functools.lru_cache(maxsize=64)
def _region_format(probe_names: tuple[str, ...], closed: bool) -> str:
    """A %-format of one region's JSON object, its probe names escaped once."""
    probes = ",".join(_ENC.encode(n).replace("%", "%%") + ":%d" for n in probe_names)
    return ('{"start":%d,"end":%d,"nr_accesses":%d,"age":%d,"probes":{' + probes + "}"
            + ("}" if closed else ""))


def snapshot_line(snap: Snapshot, written: NamesWritten | None = None) -> str:
    """``json.dumps(snapshot_to_json(snap, written), separators=(",", ":"))``, the same
    text, formatted directly: one %-format per region instead of a dict per region and
    the generic encoder.  A session writes one line per target per aggregation, and with
    cold caches after each sleep the generic path was ~20% of an idle session's CPU."""
    if snap.extra and not _OWN_KEYS.isdisjoint(snap.extra):
        return _ENC.encode(snapshot_to_json(snap, written))
    names = tuple(snap.probe_hits)
    cols = [snap.start.tolist(), snap.end.tolist(), snap.nr_accesses.tolist(),
            snap.age.tolist(), *(snap.probe_hits[n].tolist() for n in names)]
    wp = snap.written_pages.tolist() if snap.written_pages is not None else None
    if snap.page_nodes is None and not (wp is not None and any(wp)):
        fmt = _region_format(names, True)
        regions = ",".join([fmt % r for r in zip(*cols, strict=True)])
    else:
        fmt = _region_format(names, False)
        pn = snap.page_nodes
        parts = []
        for i, r in enumerate(zip(*cols, strict=True)):
            tail = ""
            if pn is not None:
                tail = ',"nodes":{' + ",".join(f'"{n}":{int(pn[i, n])}'
                                             for n in np.flatnonzero(pn[i]).tolist()) + "}"
            if wp is not None and wp[i]:
                tail += f',"written_pages":{wp[i]}'
            parts.append(fmt % r + tail + "}")
        regions = ",".join(parts)
    out = [f'{{"time_ns":{snap.time_ns:d},"pid":{snap.pid:d},"sample_us":{snap.sample_us:d},'
           f'"aggr_us":{snap.aggr_us:d},"nr_reports":{snap.nr_reports:d},'
           f'"nr_passed":{snap.nr_passed:d},"regions":[', regions, "]"]
    if snap.mapped is not None:
        out.append(',"mapped":' + _ENC.encode([[int(a), int(b)] for a, b in snap.mapped]))
    if snap.mergeable is not None:
        out.append(',"mergeable":'
                   + _ENC.encode([[int(a), int(b)] for a, b in snap.mergeable]))
    if snap.numa is not None:
        out.append(',"numa":' + _ENC.encode(snap.numa))
    names_t, threads = (written.delta(snap) if written is not None
                        else (snap.names, snap.threads or None))
    if names_t is not None:
        out.append(',"names":' + _ENC.encode([[int(a), int(b), str(n)] for a, b, n in names_t]))
    if threads:
        out.append(',"threads":'
                   + _ENC.encode({str(k): str(v) for k, v in sorted(threads.items())}))
    for k, v in (snap.extra or {}).items():
        out.append("," + _ENC.encode(k) + ":" + _ENC.encode(v))
    out.append("}")
    return "".join(out)


MAX_NODES = 1024  # the kernel's MAX_NUMNODES


def snapshot_from_json(obj: dict, where: str, probe_names: list[str],
                    written_pages: bool = False, aggr_samples: int | None = None) -> Snapshot:
    """``aggr_samples``: the header's sampling intervals per aggregation (auto-tuning
    scales both intervals and keeps it), the ceiling of every count."""
    _need(obj, SNAPSHOT_KEYS, where)
    time_ns = _int(obj["time_ns"], "time_ns", where, lo=-(1 << 63), hi=1 << 64)
    if time_ns >= 1 << 63:
        raise BadLine(f"{where}: time_ns {time_ns} does not fit a signed 64-bit clock")
    pid = _int(obj["pid"], "pid", where, lo=-(1 << 31))
    sample_us = _int(obj["sample_us"], "sample_us", where, lo=1)
    aggr_us = _int(obj.get("aggr_us", sample_us), "aggr_us", where, lo=1)
    # a count is of sampling intervals: at most those of this snapshot's own interval
    # (a last, shorter one has fewer; +1 for the one its sub-microsecond end starts)
    max_count = aggr_samples
    if "aggr_us" in obj:
        own = aggr_us // sample_us + 1
        max_count = own if max_count is None else min(max_count, own)
    regions = obj["regions"]
    if not isinstance(regions, list):
        raise BadLine(f"{where}: regions must be a list")
    n = len(regions)
    start = np.empty(n, dtype=np.uint64)
    end = np.empty(n, dtype=np.uint64)
    acc = np.empty(n, dtype=np.int64)
    age = np.empty(n, dtype=np.int64)
    hits = {name: np.zeros(n, dtype=np.int64) for name in probe_names}
    prev_end = 0
    located: list[tuple[int, dict]] = []  # (region, its "nodes")
    wpages = np.zeros(n, dtype=np.int64) if written_pages else None
    for i, r in enumerate(regions):
        rw = f"{where}: region {i}"
        if not isinstance(r, dict):
            raise BadLine(f"{rw}: must be an object")
        _need(r, ("start", "end", "nr_accesses", "age"), rw)
        s = _int(r["start"], "start", rw, hi=(1 << 64) - 1)
        e = _int(r["end"], "end", rw, hi=(1 << 64) - 1)
        if e <= s or e >= 1 << 64:
            raise BadLine(f"{rw}: end {e:#x} must be above start {s:#x} and below 2^64")
        if s < prev_end:
            raise BadLine(f"{rw}: starts at {s:#x}, inside or before the previous region")
        prev_end = e
        start[i], end[i] = s, e
        acc[i] = _int(r["nr_accesses"], "nr_accesses", rw)
        if max_count is not None and acc[i] > max_count:
            raise BadLine(f"{rw}: nr_accesses {acc[i]} is above the {max_count} sampling "
                       f"intervals of the snapshot (aggr_us {aggr_us}, sample_us {sample_us})")
        age[i] = _int(r["age"], "age", rw)
        probes = r.get("probes", {})
        if not isinstance(probes, dict):
            raise BadLine(f"{rw}: probes must be an object")
        for name, v in probes.items():
            if name not in hits:
                raise BadLine(f"{rw}: probe {name!r} is not declared in the header")
            hits[name][i] = _int(v, f"probe {name!r} hits", rw)
            if max_count is not None and hits[name][i] > max_count:
                raise BadLine(f"{rw}: probe {name!r} hits {hits[name][i]} are above the "
                              f"{max_count} sampling intervals of the snapshot")
        if "nodes" in r:
            nodes = r["nodes"]
            if not isinstance(nodes, dict) or not all(
                    k.isdigit() and int(k) < MAX_NODES and isinstance(v, int)
                    and not isinstance(v, bool) and v >= 0 for k, v in nodes.items()):
                raise BadLine(f"{rw}: nodes must map node numbers (< {MAX_NODES}) to "
                              "page counts")
            located.append((i, nodes))
        if "written_pages" in r:
            if wpages is None:  # counted, though the header did not say so
                wpages = np.zeros(n, dtype=np.int64)
            wpages[i] = _int(r["written_pages"], "written_pages", rw)
    mapped = _spans(obj, "mapped", where)
    mergeable = _spans(obj, "mergeable", where)
    numa = parse_numa(obj["numa"], where) if "numa" in obj else None
    names = parse_names(obj["names"], where) if "names" in obj else None
    threads = parse_threads(obj["threads"], where) if "threads" in obj else None
    extra = {k: obj[k] for k in ESTIMATE_KEYS if k in obj}
    for k, v in extra.items():
        if not isinstance(v, dict):
            raise BadLine(f"{where}: {k!r} must be an object")
    page_nodes = None
    if located:
        top = max((int(k) for _, d in located for k in d), default=-1) + 1
        page_nodes = np.zeros((n, top), dtype=np.int64)
        for i, d in located:
            for k, v in d.items():
                page_nodes[i, int(k)] = v
    return Snapshot(time_ns, time_ns - aggr_us * 1000, pid, sample_us, start, end, acc, age,
                    hits, _int(obj.get("nr_reports", 0), "nr_reports", where),
                    _int(obj.get("nr_passed", 0), "nr_passed", where), page_nodes,
                    written_pages=wpages, mapped=mapped, numa=numa, names=names,
                    threads=threads, extra=extra or None, mergeable=mergeable)


def _spans(obj: dict, key: str, where: str) -> list[tuple[int, int]] | None:
    """``mapped`` / ``mergeable``: a list of [start, end] address pairs, when present."""
    if key not in obj:
        return None
    spans = obj[key]
    if not isinstance(spans, list) or not all(
            isinstance(x, list) and len(x) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
            and 0 <= x[0] < x[1] < 1 << 64 for x in spans):
        raise BadLine(f"{where}: {key} must be a list of [start, end] pairs")
    return [(int(a), int(b)) for a, b in spans]



MAX_NAME = 4096  # PATH_MAX: a mapping's name is a path at most


def parse_names(names, where: str) -> list[tuple[int, int, str]]:
    """A snapshot's ``names``: [start, end, name] spans in address order."""
    ok = isinstance(names, list)
    prev = 0
    for x in names if ok else ():
        if not (isinstance(x, list) and len(x) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in x[:2])
                and isinstance(x[2], str) and 0 < len(x[2]) <= MAX_NAME
                and prev <= x[0] < x[1] < 1 << 64):
            ok = False
            break
        prev = x[1]
    if not ok:
        raise BadLine(f"{where}: names must be a list of [start, end, name] spans in address "
                      "order (start < end, names of 1..4096 characters)")
    return [(int(a), int(b), n) for a, b, n in names]


def parse_threads(threads, where: str, what: str = "threads") -> dict[int, str]:
    """Thread names (a snapshot's ``threads``, a header target's): {"<tid>": comm}."""
    if not isinstance(threads, dict) or not all(
            k.isdigit() and int(k) < 1 << 31 and isinstance(v, str) and len(v) <= MAX_NAME
            for k, v in threads.items()):
        raise BadLine(f"{where}: {what} must map thread ids to names")
    return {int(k): v for k, v in threads.items()}


def parse_numa(numa, where: str) -> dict:
    """A snapshot's locality counts: local/remote/unknown, and per thread ("unknown",
    or "-1" in older records: reports whose thread is unknown, e.g. wp's writes made by
    the kernel for the target)."""
    if not isinstance(numa, dict):
        raise BadLine(f"{where}: numa must be an object")
    out = {k: _int(numa.get(k, 0), f"numa {k}", where) for k in ("local", "remote", "unknown")}
    threads = numa.get("threads", {})
    if not isinstance(threads, dict) or not all(
            (k.isdigit() or k in ("other", "unknown", "-1")) and isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, int) and x >= 0 for x in v) for k, v in threads.items()):
        raise BadLine(f"{where}: numa threads must map thread ids to [local, remote, unknown]")
    out["threads"] = threads
    return out


