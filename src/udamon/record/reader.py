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

from udamon.core.attrs import Attrs
from udamon.core.monitor import Snapshot
from udamon.errors import InputError, RecordDamaged
from udamon.probes.filters import Filter
from udamon.probes.probe import Probe
from udamon.record.format import (
    END_KEYS,
    END_REASONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GZIP_MAGIC,
    HEADER_KEYS,
)
from udamon.record.snapshot_json import (
    BadLine,
    _int,
    _need,
    parse_threads,
    snapshot_from_json,
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

    def thread_names(self, pid: int | None = None) -> dict[int, str]:
        """{tid: comm} of the threads the record names (the header's, then the
        snapshots', later names winning) of target ``pid``, or of all targets; empty
        when the record has none (replayed input)."""
        out: dict[int, str] = {}
        for t in self.header.get("targets", []):
            if pid is None or t.get("pid") == pid:
                out.update({int(k): v for k, v in (t.get("threads") or {}).items()})
        last: dict[int, Snapshot] = {}
        for s in self.snapshots:
            if pid is None or s.pid == pid:
                last[s.pid] = s
        for s in last.values():  # a snapshot's threads: everything named up to it
            out.update(s.threads or {})
        return out

    @property
    def has_names(self) -> bool:
        """The record says which mappings its regions are in (live targets)."""
        return any(s.names is not None for s in self.snapshots)

    @property
    def coverage(self) -> str:
        return str(self.header.get("coverage", "unknown"))


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
        raise BadLine(f"{path}:{n + 1}: compressed stream is truncated (the file was cut off)"
                   ) from None
    except gzip.BadGzipFile as e:  # the magic bytes are there, the rest of the header is not
        raise BadLine(f"{path}:{n + 1}: not a valid gzip file ({e})") from None
    except zlib.error as e:
        raise BadLine(f"{path}:{n + 1}: compressed data is corrupted ({e})") from None


def _is_gzip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == GZIP_MAGIC
    except OSError:
        return False


def _parse_header(obj, where: str) -> tuple[dict, Attrs, list[Filter], list[Probe]]:
    if not isinstance(obj, dict):
        raise BadLine(f"{where}: the header must be a JSON object")
    if obj.get("format") != FORMAT_NAME:
        raise BadLine(f"{where}: not a udamon record (format is {obj.get('format')!r}, "
                   f"expected {FORMAT_NAME!r})")
    _need(obj, HEADER_KEYS, where)
    if obj["version"] != FORMAT_VERSION:
        raise BadLine(f"{where}: record version {obj['version']!r} is not supported "
                   f"(this udamon reads version {FORMAT_VERSION})")
    try:
        if not isinstance(obj["attrs"], dict):
            raise ValueError("attrs must be an object")
        attrs = Attrs.from_dict(obj["attrs"])
    except (TypeError, ValueError) as e:
        raise BadLine(f"{where}: bad attrs: {e}") from None
    try:
        if not isinstance(obj["filters"], list) or not isinstance(obj["probes"], list):
            raise ValueError("filters and probes must be lists")
        filters = [Filter.from_dict(f) for f in obj["filters"]]
        probes = [Probe.from_dict(p) for p in obj["probes"]]
    except (TypeError, ValueError) as e:
        raise BadLine(f"{where}: bad filters or probes: {e}") from None
    if not isinstance(obj["targets"], list) or not all(
            isinstance(t, dict) and isinstance(t.get("pid"), int) for t in obj["targets"]):
        raise BadLine(f"{where}: targets must be a list of objects with a 'pid'")
    for t in obj["targets"]:
        if "threads" in t:
            parse_threads(t["threads"], where, f"target {t['pid']}'s threads")
    return obj, attrs, filters, probes


def _parse_end(end, where: str) -> dict:
    """The end line: a known reason and counts >= 0 (keys may be added, so others pass)."""
    if not isinstance(end, dict):
        raise BadLine(f"{where}: 'end' must be an object")
    _need(end, END_KEYS, where)
    if end["reason"] not in END_REASONS:
        raise BadLine(f"{where}: unknown end reason {end['reason']!r} "
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
        raise BadLine(f"{where}: pid {snap.pid} is not a target in the header "
                   f"(targets: {', '.join(map(str, sorted(targets))) or 'none'})")
    prev = last_of.get(snap.pid)
    if prev is not None and snap.time_ns <= prev:
        raise BadLine(f"{where}: time_ns {snap.time_ns} is not after the previous snapshot of "
                   f"pid {snap.pid} ({prev}): snapshot times go backwards")
    last_of[snap.pid] = snap.time_ns
    if rec.header.get("clock") == "monotonic" and snap.start_ns < 0:
        raise BadLine(f"{where}: time_ns {snap.time_ns} minus aggr_us is before boot, "
                   "impossible for the monotonic clock")


class RecordReader:
    """A record read as a stream, symmetric to RecordWriter: the header is parsed
    when the reader opens, snapshots are parsed and validated one line at a time as
    it is iterated (memory: one snapshot, whatever the record's length), and ``end``
    / ``damage`` are known once the iteration is over.

    ``with RecordReader(path) as r: for snap in r: ...``.  Errors are
    RecordDamaged/InputError with ``FILE:LINE``; with ``salvage`` a damaged line
    ends the iteration instead and ``damage`` says where and why."""

    def __init__(self, path: str, *, salvage: bool = False):
        self.path = path
        self.salvage = salvage
        self.end: dict | None = None
        self.damage: str | None = None
        self.snapshots_read = 0
        self._mapped_of: dict[int, list[tuple[int, int]]] = {}
        self._mergeable_of: dict[int, list[tuple[int, int]]] = {}
        self._names_of: dict[int, list[tuple[int, int, str]]] = {}
        self._threads_of: dict[int, dict[int, str]] = {}
        self._last_of: dict[int, int] = {}
        self._lines = _lines(path)
        self._done = False
        try:
            for lineno, raw in self._lines:
                obj = _json_line(raw, f"{path}:{lineno}")
                self.header, self.attrs, self.filters, self.probes = _parse_header(
                    obj, f"{path}:{lineno}")
                break
            else:
                raise InputError(f"{path}: empty file, not a udamon record")
        except BadLine as e:
            self._lines.close()
            if path.endswith(".gz") and not _is_gzip(path):
                raise InputError(f"{path}: not a gzip file (it does not start with the gzip "
                                 f"magic bytes 1f 8b), nor a plain record: {e}") from None
            raise InputError(str(e)) from None
        self._targets = {int(t["pid"]) for t in self.header["targets"]}
        for t in self.header["targets"]:
            if "threads" in t:
                self._threads_of[int(t["pid"])] = parse_threads(t["threads"], path)
        self._shell = Record(path, self.header, self.attrs, self.filters, self.probes)

    @property
    def probe_names(self) -> list[str]:
        return [p.name for p in self.probes]

    def __iter__(self) -> Iterator[Snapshot]:
        if self._done:
            return
        try:
            yield from self._snapshots()
        except BadLine as e:
            if not self.salvage:
                raise RecordDamaged(str(e), self.snapshots_read) from None
            self.damage = str(e)
        finally:
            self._done = True
            self._lines.close()
        self._check_count()

    def _snapshots(self) -> Iterator[Snapshot]:
        written = bool(self.header.get("written_pages", False))
        names = self.probe_names
        for lineno, raw in self._lines:
            where = f"{self.path}:{lineno}"
            if self.end is not None:
                if raw.strip():
                    raise BadLine(f"{where}: data after the end line")
                continue
            obj = _json_line(raw, where)
            if not isinstance(obj, dict):
                raise BadLine(f"{where}: expected a JSON object")
            if "end" in obj:
                self.end = _parse_end(obj["end"], where)
                continue
            snap = snapshot_from_json(obj, where, names, written, self.attrs.aggr_samples)
            _check_order(snap, self._shell, self._targets, self._last_of, where)
            # "mapped" / "mergeable" are written when they change: carried forward
            if snap.mapped is not None:
                self._mapped_of[snap.pid] = snap.mapped
            else:
                snap.mapped = self._mapped_of.get(snap.pid)
            if snap.mergeable is not None:
                self._mergeable_of[snap.pid] = snap.mergeable
            else:
                snap.mergeable = self._mergeable_of.get(snap.pid)
            self._carry_names(snap)
            self.snapshots_read += 1
            yield snap

    def _carry_names(self, snap: Snapshot) -> None:
        """``names`` is written when it changes, ``threads`` holds the threads named
        since: each snapshot gets its target's whole tables (shared until they change)."""
        if snap.names is not None:
            self._names_of[snap.pid] = snap.names
        else:
            snap.names = self._names_of.get(snap.pid)
        prev = self._threads_of.get(snap.pid)
        if snap.threads:
            snap.threads = self._threads_of[snap.pid] = {**(prev or {}), **snap.threads}
        else:
            snap.threads = prev

    def _check_count(self) -> None:
        """Snapshot lines lost in between (a damaged copy, a bad merge) leave every
        remaining line valid; only the end line's count reveals them."""
        want = (self.end or {}).get("snapshots")
        got = self.snapshots_read
        if not isinstance(want, int) or isinstance(want, bool) or want == got or self.damage:
            return
        msg = (f"{self.path}: the end line says {want} snapshots but {got} were found "
               f"({abs(want - got)} snapshot line(s) {'lost' if got < want else 'too many'})")
        if not self.salvage:
            raise RecordDamaged(msg, got, counted=True)
        self.damage = msg

    def close(self) -> None:
        self._done = True
        self._lines.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_line(raw: bytes, where: str):
    if not raw.endswith(b"\n"):
        raise BadLine(f"{where}: the last line is cut off (the file was truncated)")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = getattr(e, "msg", str(e))
        raise BadLine(f"{where}: not valid JSON ({msg})") from None


def iter_record(path: str, *, salvage: bool = False) -> RecordReader:
    """Open a record for streaming (see RecordReader)."""
    return RecordReader(path, salvage=salvage)


def read_record(path: str, *, salvage: bool = False) -> Record:
    """Read and validate a whole record into memory.  Raises InputError with FILE:LINE
    (RecordDamaged when snapshots before the damage are intact).  A record file of damo
    (DAMON's user-space tool) is read as one too (record/damo_import.py)."""
    from udamon.record import damo_import

    kind = damo_import.sniff(path)
    if kind is not None:
        return damo_import.read_damo(path, kind)
    with RecordReader(path, salvage=salvage) as r:
        rec = Record(path, r.header, r.attrs, r.filters, r.probes)
        rec.snapshots.extend(r)
        rec.end, rec.damage = r.end, r.damage
    return rec
