"""Validating record reader.

Every problem is reported as ``FILE:LINE: what is wrong``.  A record that ends
without its end line (udamon was killed) is readable and says so through
``Record.complete``; a damaged line, or an end line whose snapshot count differs
from the snapshots read, is an error unless ``salvage`` is set, in which case
everything readable is returned and ``Record.damage`` says what is wrong.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from udamon.core.attrs import Attrs
from udamon.core.monitor import Snapshot
from udamon.errors import InputError
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe
from udamon.record.format import (
    END_KEYS,
    END_REASONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GZIP_MAGIC,
    HEADER_KEYS,
    SNAPSHOT_KEYS,
)


@dataclass
class Record:
    path: str
    header: dict
    attrs: Attrs
    filters: list[Filter]
    probes: list[Probe]
    snapshots: list[Snapshot] = field(default_factory=list)
    end: dict | None = None
    damage: str | None = None  # set when salvaging: where the readable part stops

    @property
    def complete(self) -> bool:
        return self.end is not None

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]

    @property
    def pids(self) -> list[int]:
        seen: dict[int, None] = {}
        for t in self.header.get("targets", []):
            seen[int(t["pid"])] = None
        for s in self.snapshots:
            seen[s.pid] = None
        return list(seen)

    def snapshots_of(self, pid: int) -> list[Snapshot]:
        return [s for s in self.snapshots if s.pid == pid]

    @property
    def coverage(self) -> str:
        return str(self.header.get("coverage", "unknown"))


class _Bad(Exception):
    pass


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a record file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    opener = gzip.open if magic == GZIP_MAGIC else open
    n = 0
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):  # noqa: B007 - n is used after the loop
                yield n, line
    except EOFError:
        raise _Bad(f"{path}:{n + 1}: compressed stream is truncated (the file was cut off)"
                   ) from None
    except gzip.BadGzipFile as e:  # the magic bytes are there, the rest of the header is not
        raise _Bad(f"{path}:{n + 1}: not a valid gzip file ({e})") from None
    except zlib.error as e:
        raise _Bad(f"{path}:{n + 1}: compressed data is corrupted ({e})") from None


def _is_gzip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == GZIP_MAGIC
    except OSError:
        return False


def _need(d: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise _Bad(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def _int(v, what: str, where: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    """An integer field within [lo, hi] (counts are held as signed 64-bit numbers)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _Bad(f"{where}: {what} must be an integer >= {lo}, got {v!r}")
    if v > hi:
        raise _Bad(f"{where}: {what} {v} is too large (at most {hi})")
    return v


def _parse_header(obj, where: str) -> tuple[dict, Attrs, list[Filter], list[Probe]]:
    if not isinstance(obj, dict):
        raise _Bad(f"{where}: the header must be a JSON object")
    if obj.get("format") != FORMAT_NAME:
        raise _Bad(f"{where}: not a udamon record (format is {obj.get('format')!r}, "
                   f"expected {FORMAT_NAME!r})")
    _need(obj, HEADER_KEYS, where)
    if obj["version"] != FORMAT_VERSION:
        raise _Bad(f"{where}: record version {obj['version']!r} is not supported "
                   f"(this udamon reads version {FORMAT_VERSION})")
    try:
        if not isinstance(obj["attrs"], dict):
            raise ValueError("attrs must be an object")
        attrs = Attrs.from_dict(obj["attrs"])
    except (TypeError, ValueError) as e:
        raise _Bad(f"{where}: bad attrs: {e}") from None
    try:
        if not isinstance(obj["filters"], list) or not isinstance(obj["probes"], list):
            raise ValueError("filters and probes must be lists")
        filters = [Filter.from_dict(f) for f in obj["filters"]]
        probes = [Probe.from_dict(p) for p in obj["probes"]]
    except (TypeError, ValueError) as e:
        raise _Bad(f"{where}: bad filters or probes: {e}") from None
    if not isinstance(obj["targets"], list) or not all(
            isinstance(t, dict) and isinstance(t.get("pid"), int) for t in obj["targets"]):
        raise _Bad(f"{where}: targets must be a list of objects with a 'pid'")
    return obj, attrs, filters, probes


def _parse_snapshot(obj: dict, where: str, probe_names: list[str],
                    written_pages: bool = False, aggr_samples: int | None = None) -> Snapshot:
    """``aggr_samples``: the header's sampling intervals per aggregation (auto-tuning
    scales both intervals and keeps it), the ceiling of every count."""
    _need(obj, SNAPSHOT_KEYS, where)
    time_ns = _int(obj["time_ns"], "time_ns", where, lo=-(1 << 63))
    if time_ns >= 1 << 63:
        raise _Bad(f"{where}: time_ns {time_ns} does not fit a signed 64-bit clock")
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
        raise _Bad(f"{where}: regions must be a list")
    n = len(regions)
    start = np.empty(n, dtype=np.uint64)
    end = np.empty(n, dtype=np.uint64)
    acc = np.empty(n, dtype=np.int64)
    age = np.empty(n, dtype=np.int64)
    hits = {name: np.zeros(n, dtype=np.int64) for name in probe_names}
    prev_end = 0
    page_nodes: list[dict[str, int]] | None = None
    wpages = np.zeros(n, dtype=np.int64) if written_pages else None
    for i, r in enumerate(regions):
        rw = f"{where}: region {i}"
        if not isinstance(r, dict):
            raise _Bad(f"{rw}: must be an object")
        _need(r, ("start", "end", "nr_accesses", "age"), rw)
        s = _int(r["start"], "start", rw, hi=(1 << 64) - 1)
        e = _int(r["end"], "end", rw, hi=(1 << 64) - 1)
        if e <= s or e >= 1 << 64:
            raise _Bad(f"{rw}: end {e:#x} must be above start {s:#x} and below 2^64")
        if s < prev_end:
            raise _Bad(f"{rw}: starts at {s:#x}, inside or before the previous region")
        prev_end = e
        start[i], end[i] = s, e
        acc[i] = _int(r["nr_accesses"], "nr_accesses", rw)
        if max_count is not None and acc[i] > max_count:
            raise _Bad(f"{rw}: nr_accesses {acc[i]} is above the {max_count} sampling "
                       f"intervals of the snapshot (aggr_us {aggr_us}, sample_us {sample_us})")
        age[i] = _int(r["age"], "age", rw)
        probes = r.get("probes", {})
        if not isinstance(probes, dict):
            raise _Bad(f"{rw}: probes must be an object")
        for name, v in probes.items():
            if name not in hits:
                raise _Bad(f"{rw}: probe {name!r} is not declared in the header")
            hits[name][i] = _int(v, f"probe {name!r} hits", rw)
            if max_count is not None and hits[name][i] > max_count:
                raise _Bad(f"{rw}: probe {name!r} hits {hits[name][i]} are above the "
                           f"{max_count} sampling intervals of the snapshot")
        if "nodes" in r:
            nodes = r["nodes"]
            if not isinstance(nodes, dict) or not all(
                    k.isdigit() and isinstance(v, int) and v >= 0 for k, v in nodes.items()):
                raise _Bad(f"{rw}: nodes must map node numbers to page counts")
            if page_nodes is None:
                page_nodes = [{} for _ in range(n)]
            page_nodes[i] = nodes
        if "written_pages" in r:
            if wpages is None:  # counted, though the header did not say so
                wpages = np.zeros(n, dtype=np.int64)
            wpages[i] = _int(r["written_pages"], "written_pages", rw)
    mapped = _spans(obj, "mapped", where)
    mergeable = _spans(obj, "mergeable", where)
    numa = _parse_numa(obj["numa"], where) if "numa" in obj else None
    return Snapshot(time_ns, time_ns - aggr_us * 1000, pid, sample_us, start, end, acc, age,
                    hits, _int(obj.get("nr_reports", 0), "nr_reports", where),
                    _int(obj.get("nr_passed", 0), "nr_passed", where), page_nodes,
                    written_pages=wpages, mapped=mapped, numa=numa, mergeable=mergeable)


def _spans(obj: dict, key: str, where: str) -> list[tuple[int, int]] | None:
    """``mapped`` / ``mergeable``: a list of [start, end] address pairs, when present."""
    if key not in obj:
        return None
    spans = obj[key]
    if not isinstance(spans, list) or not all(
            isinstance(x, list) and len(x) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in x)
            and 0 <= x[0] < x[1] < 1 << 64 for x in spans):
        raise _Bad(f"{where}: {key} must be a list of [start, end] pairs")
    return [(int(a), int(b)) for a, b in spans]


def _parse_numa(numa, where: str) -> dict:
    """A snapshot's locality counts: local/remote/unknown, and per thread ("unknown",
    or "-1" in older records: reports whose thread is unknown, e.g. wp's writes made by
    the kernel for the target)."""
    if not isinstance(numa, dict):
        raise _Bad(f"{where}: numa must be an object")
    out = {k: _int(numa.get(k, 0), f"numa {k}", where) for k in ("local", "remote", "unknown")}
    threads = numa.get("threads", {})
    if not isinstance(threads, dict) or not all(
            (k.isdigit() or k in ("other", "unknown", "-1")) and isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, int) and x >= 0 for x in v) for k, v in threads.items()):
        raise _Bad(f"{where}: numa threads must map thread ids to [local, remote, unknown]")
    out["threads"] = threads
    return out


def _parse_end(end, where: str) -> dict:
    """The end line: a known reason and counts >= 0 (keys may be added, so others pass)."""
    if not isinstance(end, dict):
        raise _Bad(f"{where}: 'end' must be an object")
    _need(end, END_KEYS, where)
    if end["reason"] not in END_REASONS:
        raise _Bad(f"{where}: unknown end reason {end['reason']!r} "
                   f"(known: {', '.join(END_REASONS)})")
    for key in ("dropped_reports", "lost_samples", "snapshots", "reports",
                "unmatched_reports", "outside_reports", "late_reports"):
        if key in end:
            _int(end[key], f"end {key}", where)
    return end


def _check_order(snap: Snapshot, rec: Record, targets: set[int], last_of: dict[int, int],
                 where: str) -> None:
    """What no writer produces: a pid the header does not name (targets are known
    before the header is written, live or replay), a snapshot not after the previous
    one of its target, and a monotonic-clock interval starting before boot."""
    if snap.pid not in targets:
        raise _Bad(f"{where}: pid {snap.pid} is not a target in the header "
                   f"(targets: {', '.join(map(str, sorted(targets))) or 'none'})")
    prev = last_of.get(snap.pid)
    if prev is not None and snap.time_ns <= prev:
        raise _Bad(f"{where}: time_ns {snap.time_ns} is not after the previous snapshot of "
                   f"pid {snap.pid} ({prev}): snapshot times go backwards")
    last_of[snap.pid] = snap.time_ns
    if rec.header.get("clock") == "monotonic" and snap.start_ns < 0:
        raise _Bad(f"{where}: time_ns {snap.time_ns} minus aggr_us is before boot, "
                   "impossible for the monotonic clock")


def read_record(path: str, *, salvage: bool = False) -> Record:
    """Read and validate a whole record.  Raises InputError with FILE:LINE."""
    rec: Record | None = None
    mapped_of: dict[int, list[tuple[int, int]]] = {}
    mergeable_of: dict[int, list[tuple[int, int]]] = {}
    last_of: dict[int, int] = {}
    targets: set[int] = set()
    try:
        for lineno, raw in _lines(path):
            where = f"{path}:{lineno}"
            if rec is not None and rec.end is not None:
                if raw.strip():
                    raise _Bad(f"{where}: data after the end line")
                continue
            if not raw.endswith(b"\n"):
                raise _Bad(f"{where}: the last line is cut off (the file was truncated)")
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = getattr(e, "msg", str(e))
                raise _Bad(f"{where}: not valid JSON ({msg})") from None
            if rec is None:
                header, attrs, filters, probes = _parse_header(obj, where)
                rec = Record(path, header, attrs, filters, probes)
                targets = {int(t["pid"]) for t in header["targets"]}
                continue
            if not isinstance(obj, dict):
                raise _Bad(f"{where}: expected a JSON object")
            if "end" in obj:
                rec.end = _parse_end(obj["end"], where)
                continue
            snap = _parse_snapshot(obj, where, rec.probe_names,
                                   bool(rec.header.get("written_pages", False)),
                                   rec.attrs.aggr_samples)
            _check_order(snap, rec, targets, last_of, where)
            # "mapped" / "mergeable" are written when they change: carried forward
            if snap.mapped is not None:
                mapped_of[snap.pid] = snap.mapped
            else:
                snap.mapped = mapped_of.get(snap.pid)
            if snap.mergeable is not None:
                mergeable_of[snap.pid] = snap.mergeable
            else:
                snap.mergeable = mergeable_of.get(snap.pid)
            rec.snapshots.append(snap)
    except _Bad as e:
        if salvage and rec is not None:
            rec.damage = str(e)
            return rec
        if rec is None and path.endswith(".gz") and not _is_gzip(path):
            raise InputError(f"{path}: not a gzip file (it does not start with the gzip "
                             f"magic bytes 1f 8b), nor a plain record: {e}") from None
        hint = ""
        if rec is not None and rec.snapshots:
            hint = f" ({len(rec.snapshots)} snapshots before it are intact; --salvage reads them)"
        raise InputError(f"{e}{hint}") from None
    if rec is None:
        raise InputError(f"{path}: empty file, not a udamon record")
    _check_count(rec, salvage)
    return rec


def _check_count(rec: Record, salvage: bool) -> None:
    """Snapshot lines lost in between (a damaged copy, a bad merge) leave every
    remaining line valid; only the end line's count reveals them."""
    want = (rec.end or {}).get("snapshots")
    if not isinstance(want, int) or isinstance(want, bool) or want == len(rec.snapshots):
        return
    got = len(rec.snapshots)
    msg = (f"{rec.path}: the end line says {want} snapshots but {got} were found "
           f"({abs(want - got)} snapshot line(s) {'lost' if got < want else 'too many'})")
    if not salvage:
        raise InputError(f"{msg}; --salvage reads what is there")
    rec.damage = msg
