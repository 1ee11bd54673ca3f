"""The replay primitive: a recorded stream of access reports from a CSV file.

Input contract (DESIGN.md): a header ``time_ns,pid,tid,cpu,addr,size,write``
(column order free; optional extra columns ``node``, ``source``, ``mem`` and
``page_node``), one report per line, sorted by time.  Integers are decimal; ``addr``
may be 0x-hex.  Blank lines and lines starting with ``#`` (comments) are skipped.
"""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import InputError
from udamon.intake.reports import MEM_LEVELS, SOURCE_IDS, empty
from udamon.primitives.base import Primitive
from udamon.targets.topology import nodes_of

REQUIRED = ("time_ns", "pid", "tid", "cpu", "addr", "size", "write")
OPTIONAL = ("node", "source", "mem", "page_node")
CHUNK = 65_536


def _open_text(path: str):
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":
            return gzip.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")  # noqa: SIM115 - caller closes
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a CSV file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None


def _unreadable(path: str, e: Exception) -> InputError:
    """Text is decoded in blocks, so a decoding error's own position is not the line:
    find the first line that does not decode (cheap, only on error)."""
    msg = f"{path}: cannot read ({e})"
    if isinstance(e, gzip.BadGzipFile):
        msg = f"{path}: not a valid gzip file ({e})"
    elif isinstance(e, (EOFError, zlib.error)):
        msg = f"{path}: compressed data is truncated or corrupted ({e})"
    elif isinstance(e, UnicodeDecodeError):
        opener = gzip.open if _is_gzip(path) else open
        try:
            with opener(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError as le:
                        msg = (f"{path}:{n}: not UTF-8 text (byte {raw[le.start]:#04x} at "
                               f"column {le.start + 1})")
                        break
        except (OSError, EOFError, zlib.error):
            pass
    return InputError(_not_gzip(path, msg))


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _not_gzip(path: str, msg: str) -> str:
    """A name that says gzip and content that does not: say so before the error that
    reading it as plain text ran into."""
    if path.endswith(".gz") and not _is_gzip(path):
        return (f"{path}: not a gzip file (it does not start with the gzip magic bytes "
                f"1f 8b), nor a CSV: {msg}")
    return msg


def is_comment(line: str) -> bool:
    """A line that holds no report: blank, or a comment starting with '#'."""
    text = line.strip()
    return not text or text.startswith("#")


def columns(path: str) -> list[str]:
    """The header's column names ([] when unreadable: read_csv says why, with the line)."""
    try:
        with _open_text(path) as f:
            first = next((line for line in f if not is_comment(line)), "")
    except (InputError, UnicodeDecodeError, EOFError, OSError, ValueError, zlib.error):
        return []
    return [c.strip().strip('"') for c in first.strip().split(",")]


def _conv(name: str, text: str, where: str) -> int:
    """Convert and check one field; used to name the exact bad line."""
    text = text.strip()
    try:
        v = int(text, 0) if name == "addr" else int(text)
    except ValueError:
        raise InputError(f"{where}: field {name!r}: {text!r} is not an integer") from None
    lo, hi = _LIMITS[name]
    if not lo <= v <= hi:
        raise InputError(f"{where}: field {name!r}: {text!r} is out of range "
                         f"({_LIMIT_TEXT[name]})")
    return v


# An access must end below the last page under 2^64: monitored ranges are whole pages
# and a region's end (exclusive) must itself be below 2^64.
ADDR_END = (1 << 64) - 4096
_LIMITS = {"time_ns": (-(1 << 63), (1 << 63) - 1), "pid": (0, (1 << 31) - 1),
           "tid": (-1, (1 << 31) - 1), "cpu": (-1, (1 << 31) - 1), "node": (-1, (1 << 31) - 1),
           "page_node": (-1, (1 << 31) - 1),
           "addr": (0, ADDR_END - 1), "size": (1, ADDR_END), "write": (0, 1),
           "mem": (0, len(MEM_LEVELS) - 1)}
_LIMIT_TEXT = {"time_ns": "a signed 64-bit integer", "pid": "a process id >= 0",
               "tid": "-1 (unknown) or a thread id", "cpu": "-1 (unknown) or a CPU number",
               "node": "-1 (unknown) or a node number",
               "page_node": "-1 (unknown) or the node number of the accessed page",
               "addr": f"0 to {ADDR_END - 1:#x}: the last page below 2^64 is left out",
               "size": f"1 to {ADDR_END:#x}", "write": "0 or 1",
               "mem": "a memory level 0 to 5: " + ", ".join(
                   f"{i} {n}" for i, n in enumerate(MEM_LEVELS))}


def parse_header(line: str, where: str) -> list[str]:
    """The column names of a header line; InputError naming ``where`` when bad."""
    cols = [c.strip().strip('"') for c in line.strip().split(",")]
    missing = [c for c in REQUIRED if c not in cols]
    unknown = [c for c in cols if c not in REQUIRED + OPTIONAL]
    if missing or unknown or len(set(cols)) != len(cols):
        what = []
        if missing:
            what.append("missing " + ", ".join(missing))
        if unknown:
            what.append("unknown " + ", ".join(unknown))
        if len(set(cols)) != len(cols):
            what.append("duplicate columns")
        raise InputError(f"{where}: bad header ({'; '.join(what)}); expected "
                         f"'{','.join(REQUIRED)}' (optional: {', '.join(OPTIONAL)})")
    return cols


def read_csv(path: str, chunk: int = CHUNK,
             linenos_out: list[int] | None = None) -> Iterator[np.ndarray]:
    """Yield REPORT_DTYPE chunks; raises InputError naming FILE:LINE on bad data.

    Parsing is vectorised per chunk (numpy converts the text columns); when a
    chunk fails, it is re-checked field by field to name the exact line.  When
    ``linenos_out`` is given, it holds the line numbers of the chunk last yielded (so
    later stages can name a line too).
    """
    f = _open_text(path)
    with f:
        lineno = 0
        try:
            while True:  # comments and blank lines may come before the header
                first = f.readline()
                lineno += 1
                if not first or not is_comment(first):
                    break
        except (UnicodeDecodeError, EOFError, OSError, zlib.error) as e:
            raise _unreadable(path, e) from None
        if not first.strip():
            raise InputError(f"{path}: empty file (expected a header "
                             f"'{','.join(REQUIRED)}')")
        try:
            cols = parse_header(first, f"{path}:{lineno}")
        except InputError as e:
            raise InputError(_not_gzip(path, str(e))) from None
        ncol = len(cols)
        last_time: int | None = None
        while True:
            try:
                lines = list(itertools.islice(f, chunk))
            except (UnicodeDecodeError, EOFError, OSError, ValueError, zlib.error) as e:
                raise _unreadable(path, e) from None
            if not lines:
                return
            linenos = []
            rows = []
            for i, line in enumerate(lines, lineno + 1):
                if not is_comment(line):
                    rows.append(line)
                    linenos.append(i)
            lineno += len(lines)
            if (not lines[-1].endswith("\n") and not is_comment(lines[-1])
                    and lines[-1].count(",") != ncol - 1):
                raise InputError(f"{path}:{linenos[-1]}: the last line is cut off")
            if not rows:
                continue
            out = parse_rows(path, rows, linenos, cols, ncol)
            t = out["time_ns"]
            if last_time is not None and t[0] < last_time:
                _backwards(path, linenos[0], int(t[0]), last_time)
            back = np.flatnonzero(t[1:] < t[:-1])
            if back.size:
                i = int(back[0]) + 1
                _backwards(path, linenos[i], int(t[i]), int(t[i - 1]))
            last_time = int(t[-1])
            if linenos_out is not None:
                linenos_out[:] = linenos
            yield out


def _backwards(path: str, line: int, t: int, prev: int):
    raise InputError(f"{path}:{line}: time_ns goes backwards ({t} after {prev}); "
                     "replay input must be sorted by time")


def parse_rows(path: str, rows: list[str], linenos: list[int], cols: list[str],
               ncol: int) -> np.ndarray:
    """CSV lines (without the header) -> REPORT_DTYPE; InputError naming ``path:LINE``."""
    dt = np.dtype([(c, "U16" if c == "source" else
                    (np.uint64 if c in ("addr", "size") else np.int64)) for c in cols])
    try:
        # comments=None: a '#' inside a row is an error of that row (comment lines are
        # dropped before), never a silently shorter table
        table = np.loadtxt(rows, delimiter=",", dtype=dt, ndmin=1, comments=None,
                           quotechar=None)
        if table.size != len(rows):
            raise ValueError("rows")
        for name in cols:
            if name != "source":
                lo, hi = _LIMITS[name]
                if ((table[name] < lo) | (table[name] > hi)).any():
                    raise ValueError(name)
    except ValueError:
        table = _parse_slow(path, rows, linenos, cols, ncol, dt)
    over = np.flatnonzero(table["size"] > np.uint64(ADDR_END) - table["addr"])
    if over.size:
        i = int(over[0])
        raise InputError(f"{path}:{linenos[i]}: addr {int(table['addr'][i]):#x} + size "
                         f"{int(table['size'][i])} ends above {ADDR_END:#x} (accesses must "
                         "end below the last page under 2^64)")
    out = empty(len(rows))
    for name in cols:
        if name == "source":
            col = np.char.strip(table[name])
            ids = np.full(col.shape, 255, dtype=np.int64)
            for sname, sid in SOURCE_IDS.items():
                ids[col == sname] = sid
            if (ids == 255).any():
                i = int(np.flatnonzero(ids == 255)[0])
                raise InputError(f"{path}:{linenos[i]}: unknown source {str(col[i])!r} "
                                 f"(known: {', '.join(SOURCE_IDS)})")
            out["source"] = ids
        else:
            out[name] = table[name]
    if "source" not in cols:
        out["source"] = SOURCE_IDS["replay"]
    return out


def _parse_slow(path: str, rows: list[str], linenos: list[int], cols: list[str], ncol: int,
                dt: np.dtype) -> np.ndarray:
    """Field-by-field conversion: accepts 0x-hex addresses and names the first bad line."""
    table = np.empty(len(rows), dtype=dt)
    for i, (row, ln) in enumerate(zip(rows, linenos, strict=True)):
        fields = row.strip().split(",")
        if len(fields) != ncol:
            raise InputError(f"{path}:{ln}: expected {ncol} fields, got {len(fields)}")
        table[i] = tuple(f.strip() if name == "source" else _conv(name, f, f"{path}:{ln}")
                         for name, f in zip(cols, fields, strict=True))
    return table


@dataclass
class InputSummary:
    """What a pre-pass over a replay input learns: ranges per pid (the spans of
    touched pages, cut at the two largest gaps like DAMON's vaddr heuristic),
    and who appears in it (for --breakdown)."""

    ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    cpus: set[int] = field(default_factory=set)
    nodes: set[int] = field(default_factory=set)
    tids: dict[int, set[int]] = field(default_factory=dict)
    reports: int = 0


def summarize(path: str, page: int = 4096, reader=None) -> InputSummary:
    """``reader(path)`` yields the input's report chunks (default: read_csv)."""
    summary = InputSummary()
    pages: dict[int, np.ndarray] = {}
    for chunk in (reader or read_csv)(path):
        summary.reports += int(chunk.size)
        summary.cpus.update(int(c) for c in np.unique(chunk["cpu"]) if c >= 0)
        nodes = chunk["node"]
        known = chunk["cpu"] >= 0
        derived = nodes_of(chunk["cpu"][known & (nodes < 0)])
        summary.nodes.update(int(n) for n in np.unique(np.concatenate(
            [nodes[nodes >= 0], derived])) if n >= 0)
        for pid in np.unique(chunk["pid"]).tolist():
            sel = chunk[chunk["pid"] == pid]
            summary.tids.setdefault(pid, set()).update(
                int(t) for t in np.unique(sel["tid"]) if t >= 0)
            first = sel["addr"] // np.uint64(page)
            last = (sel["addr"] + sel["size"] - np.uint64(1)) // np.uint64(page)
            p = np.unique(np.concatenate([first, last]))
            prev = pages.get(pid)
            pages[pid] = p if prev is None else np.union1d(prev, p)
    for pid, p in pages.items():
        p = p.astype(np.uint64)
        gaps = np.diff(p)
        cut = np.argsort(gaps)[::-1][:2] if gaps.size else np.array([], dtype=np.int64)
        cut = sorted(int(c) for c in cut if gaps[c] > 1)
        bounds = [0] + [c + 1 for c in cut] + [p.size]
        summary.ranges[pid] = [(int(p[a]) * page, (int(p[b - 1]) + 1) * page)
                               for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return summary


class ReplayPrimitive(Primitive):
    """Observational; the input is taken as the whole truth of what was accessed."""

    name = "replay"
    kind = "observational"
    coverage = "complete"

    def __init__(self, path: str, chunk: int = CHUNK, reader=None):
        """``reader(path, chunk, linenos_out)``: the input format's chunk reader
        (default read_csv; perf_script.read_perf_script for perf script output)."""
        self.path = path
        self._lines: list[int] = []
        self._it = (reader or read_csv)(path, chunk, self._lines)

    def where(self, i: int) -> str:
        """``FILE:LINE`` of report ``i`` of the chunk last read."""
        return f"{self.path}:{self._lines[i]}" if i < len(self._lines) else self.path

    def chunks(self) -> Iterator[np.ndarray]:
        return self._it

    def poll(self, now_ns: int) -> np.ndarray:  # replay is data-driven; see Session
        return next(self._it, empty(0))
