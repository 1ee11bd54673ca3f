"""The replay primitive: a recorded stream of access reports from a CSV file.

Input contract (DESIGN.md): a header ``time_ns,pid,tid,cpu,addr,size,write``
(column order free; optional extra columns ``node``, ``source``, ``mem`` and
``page_node``; udamon.intake.csv_format parses them), one report per line, sorted by
time.  Integers are decimal; ``addr`` may be 0x-hex.  Blank lines and lines starting
with ``#`` (comments) are skipped.
"""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from udamon.errors import InputError
from udamon.intake.csv_format import (  # noqa: F401 - the CSV format, also for callers
    ADDR_END,
    OPTIONAL,
    REQUIRED,
    is_comment,
    parse_header,
    parse_rows,
)
from udamon.primitives.base import Primitive
from udamon.targets.topology import nodes_of

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


def columns(path: str) -> list[str]:
    """The header's column names ([] when unreadable: read_csv says why, with the line)."""
    try:
        with _open_text(path) as f:
            first = next((line for line in f if not is_comment(line)), "")
    except (InputError, UnicodeDecodeError, EOFError, OSError, ValueError, zlib.error):
        return []
    return [c.strip().strip('"') for c in first.strip().split(",")]


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


def summarize(path: str, page: int = 4096, reader=None,
              cpu_nodes: np.ndarray | None = None) -> InputSummary:
    """``reader(path)`` yields the input's report chunks (default: read_csv);
    ``cpu_nodes``: the CPU-to-node table for reports without a node (default: this
    machine's, as the Monitor's buffer fills them)."""
    summary = InputSummary()
    pages: dict[int, np.ndarray] = {}
    for chunk in (reader or read_csv)(path):
        summary.reports += int(chunk.size)
        summary.cpus.update(int(c) for c in np.unique(chunk["cpu"]) if c >= 0)
        nodes = chunk["node"]
        known = chunk["cpu"] >= 0
        derived = nodes_of(chunk["cpu"][known & (nodes < 0)], cpu_nodes)
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
