"""The text (CSV) framing of access reports: the replay input's and the report channel's.

One report per line, after a header naming the columns: ``time_ns,pid,tid,cpu,addr,
size,write`` in any order, optional ``node``, ``source`` (a name), ``mem`` (a memory
level) and ``page_node``.  Parsing is vectorised (numpy) with a field-by-field
fallback that names the first bad line; every error is an InputError naming
``FILE:LINE``.
"""

from __future__ import annotations

import numpy as np

from udamon.errors import InputError
from udamon.intake.reports import MEM_LEVELS, SOURCE_IDS, empty

REQUIRED = ("time_ns", "pid", "tid", "cpu", "addr", "size", "write")
OPTIONAL = ("node", "source", "mem", "page_node")
def _conv(name: str, text: str, where: str) -> int:
    """Convert and check one field; used to name the exact bad line."""
    text = text.strip()
    try:
        if not text.isascii():  # int() takes other scripts' digits ('٣' is 3)
            raise ValueError
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
# times within +-2^62 ns (146 years): the ends of the aggregation intervals around them
# stay in the record's signed 64-bit clock
TIME_LIMIT = 1 << 62
_LIMITS = {"time_ns": (-TIME_LIMIT, TIME_LIMIT), "pid": (0, (1 << 31) - 1),
           "tid": (-1, (1 << 31) - 1), "cpu": (-1, (1 << 31) - 1), "node": (-1, (1 << 31) - 1),
           "page_node": (-1, (1 << 31) - 1),
           "addr": (0, ADDR_END - 1), "size": (1, ADDR_END), "write": (0, 1),
           "mem": (0, len(MEM_LEVELS) - 1)}
_LIMIT_TEXT = {"time_ns": "within +-2^62 ns, so that interval ends fit a 64-bit clock",
               "pid": "a process id >= 0",
               "tid": "-1 (unknown) or a thread id", "cpu": "-1 (unknown) or a CPU number",
               "node": "-1 (unknown) or a node number",
               "page_node": "-1 (unknown) or the node number of the accessed page",
               "addr": f"0 to {ADDR_END - 1:#x}: the last page below 2^64 is left out",
               "size": f"1 to {ADDR_END:#x}", "write": "0 or 1",
               "mem": "a memory level 0 to 5: " + ", ".join(
                   f"{i} {n}" for i, n in enumerate(MEM_LEVELS))}


def is_comment(line: str) -> bool:
    """A line that holds no report: blank, or a comment starting with '#'."""
    text = line.strip()
    return not text or text.startswith("#")


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


def parse_rows(path: str, rows: list[str], linenos: list[int], cols: list[str],
               ncol: int) -> np.ndarray:
    """CSV lines (without the header) -> REPORT_DTYPE; InputError naming ``path:LINE``."""
    dt = np.dtype([(c, "U16" if c == "source" else
                    (np.uint64 if c in ("addr", "size") else np.int64)) for c in cols])
    try:
        # numpy's loadtxt reads a lone non-ASCII character in an integer field as its
        # code point ('\U0010f1ee' -> 1110462) and crashes (SIGSEGV, numpy 2.4) when
        # such a field comes before an empty last one: every field udamon reads is
        # ASCII, so other text goes to the field-by-field path, which names the line
        if not all(r.isascii() for r in rows):
            raise ValueError("not ASCII")
        # comments=None: a '#' inside a row is an error of that row (comment lines are
        # dropped before, is_comment), never a silently shorter table
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


# Every column, in the order a writer of the format puts them (the reader takes any order).
ALL_COLUMNS = ("time_ns", "pid", "tid", "cpu", "node", "addr", "size", "write", "source",
               "mem", "page_node")


def format_rows(reports: np.ndarray) -> str:
    """REPORT_DTYPE -> CSV lines of ALL_COLUMNS (no header): what parse_rows reads back
    to the same reports."""
    if reports.size == 0:
        return ""
    from udamon.intake.reports import SOURCES

    names = np.asarray(SOURCES + ("?",) * (256 - len(SOURCES)), dtype=object)
    cols = [reports[c].astype(str).astype(object) for c in ("time_ns", "pid", "tid", "cpu",
                                                            "node", "addr", "size")]
    cols.append(reports["write"].astype(np.int8).astype(str).astype(object))
    cols.append(names[reports["source"]])
    cols += [reports[c].astype(str).astype(object) for c in ("mem", "page_node")]
    line = cols[0]
    for c in cols[1:]:
        line = line + "," + c
    return "\n".join(line.tolist()) + "\n"
