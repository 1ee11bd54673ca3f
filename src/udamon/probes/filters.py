"""Sample filters and probe filters: one model, DAMOS filter semantics.

A filter has a ``type`` (what it tests), a ``value`` (for the types that take
one), ``matching`` and ``allow``.  Filters are evaluated in order: the first
filter whose test result equals ``matching`` decides (allow or reject).  When
none decides, the report is allowed only when the last filter is a reject
filter, or when there are no filters.  (That is the upstream DAMOS rule; see
DESIGN.md.)

The command line speaks in conditions that must all hold
(``cpus:0-3,write``, ``!threads:42``); ``parse_conditions`` turns them into
the equivalent ordered list: one reject filter per condition, rejecting the
reports for which the condition does not hold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from udamon.intake.reports import MEM_IDS, MEM_LEVELS, SOURCE_IDS, SOURCES
from udamon.targets.topology import parse_cpulist
from udamon.units import parse_range

# type -> (takes a value, description for --help and errors)
FILTER_TYPES: dict[str, tuple[bool, str]] = {
    "cpus": (True, "made by one of these CPUs, e.g. cpus:0-3,8"),
    "nodes": (True, "made by a CPU of one of these NUMA nodes, e.g. nodes:1"),
    "threads": (True, "made by one of these thread ids, e.g. threads:1234+1240"),
    "pids": (True, "made by one of these processes, e.g. pids:1234"),
    "write": (False, "a write"),
    "read": (False, "a read"),
    "addr": (True, "to an address in [START, END), e.g. addr:0x7f0000000000-0x7f0000100000"),
    "local": (False, "local: made by a CPU of the node that holds the page (both known)"),
    "remote": (False, "remote: made by a CPU of another node than the page's (both known)"),
    "page_nodes": (True, "to a page held by one of these NUMA nodes, e.g. page_nodes:1"),
    "source": (True, f"seen by one of these sources ({'/'.join(SOURCES)}), e.g. source:hint"),
    "mem": (True, f"served from one of these levels ({'/'.join(MEM_LEVELS)}; local = "
                  "cache+ram, remote = remote-ram+remote-cache; known for pmu and perf mem "
                  "samples), e.g. mem:remote-ram"),
    # evaluated by the kernel's DAMON only (--primitive kernel, probes; Linux 7.2+):
    # reports do not say what backs a page
    "anon": (False, "to an anonymous page (kernel primitive probes only)"),
    "memcg": (True, "to a page of this memory cgroup, e.g. memcg:/system.slice (kernel "
                    "primitive probes only)"),
}

# types only the kernel's DAMON evaluates (its probe filters); no report carries them
KERNEL_ONLY_TYPES = ("anon", "memcg")

# shorthands of the mem filter: the two sides of the NUMA question
MEM_ALIASES = {"local": ("cache", "ram"), "remote": ("remote-ram", "remote-cache")}

_LIST_TYPES = ("cpus", "nodes", "threads", "pids", "page_nodes")
# what the ids of each list type are, for errors; reports hold them as int32 (the
# replay input's limit too), so a larger id can never match and is a mistake
ID_NAMES = {"cpus": "CPU", "nodes": "node", "threads": "thread id", "pids": "process id",
            "page_nodes": "node"}
MAX_ID = (1 << 31) - 1


# the report column each list type tests
_COLUMN = {"cpus": "cpu", "nodes": "node", "threads": "tid", "pids": "pid",
           "page_nodes": "page_node", "source": "source", "mem": "mem"}


def _parse_id_list(text: str) -> list[int]:
    # Inside a condition list, ',' separates conditions, so id lists use '+'
    # between items (the kernel's ',' is accepted where the value stands alone).
    return parse_cpulist(text.replace("+", ","))


@dataclass(frozen=True)
class Filter:
    type: str
    value: str | None = None
    matching: bool = True
    allow: bool = True
    # Parsed value, derived from ``value`` in __post_init__.
    _ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    _range: tuple[int, int] = field(default=(0, 0), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.type not in FILTER_TYPES:
            raise ValueError(
                f"unknown filter type {self.type!r} (known: {', '.join(FILTER_TYPES)})"
            )
        takes_value, _ = FILTER_TYPES[self.type]
        if takes_value and not self.value:
            raise ValueError(f"filter type {self.type!r} needs a value "
                             f"({FILTER_TYPES[self.type][1]})")
        if not takes_value and self.value:
            raise ValueError(f"filter type {self.type!r} takes no value (got {self.value!r})")
        if self.type in _LIST_TYPES:
            ids = _parse_id_list(self.value or "")
            if not ids:
                raise ValueError(f"filter {self.type!r} needs at least one id")
            if ids[-1] > MAX_ID:
                what = ID_NAMES[self.type]
                raise ValueError(f"bad {what} {ids[-1]} ({what}s are 0 to {MAX_ID})")
            object.__setattr__(self, "_ids", tuple(ids))
        elif self.type == "addr":
            object.__setattr__(self, "_range", parse_range(self.value or ""))
        elif self.type == "source":
            ids = []
            for name in (self.value or "").replace("+", ",").split(","):
                name = name.strip()
                if name not in SOURCE_IDS:
                    raise ValueError(f"unknown source {name!r} (known: {', '.join(SOURCES)})")
                ids.append(SOURCE_IDS[name])
            object.__setattr__(self, "_ids", tuple(sorted(set(ids))))
        elif self.type == "mem":
            ids = []
            for name in (self.value or "").replace("+", ",").split(","):
                name = name.strip()
                for level in MEM_ALIASES.get(name, (name,)):
                    if level not in MEM_IDS:
                        raise ValueError(f"unknown memory level {name!r} (known: "
                                         f"{', '.join([*MEM_LEVELS, *MEM_ALIASES])})")
                    ids.append(MEM_IDS[level])
            object.__setattr__(self, "_ids", tuple(sorted(set(ids))))

    # -- evaluation -------------------------------------------------------

    def test(self, reports: np.ndarray) -> np.ndarray:
        """The type's test on each report (before ``matching`` is applied)."""
        t = self.type
        if t in KERNEL_ONLY_TYPES:
            raise ValueError(f"filter type {t!r} is evaluated by the kernel's DAMON only")
        if t == "write":
            return reports["write"].astype(bool, copy=False)
        if t == "read":
            return ~reports["write"].astype(bool, copy=False)
        if t in ("local", "remote"):
            cpu_node, page_node = reports["node"], reports["page_node"]
            known = (cpu_node >= 0) & (page_node >= 0)  # unknown never matches
            same = cpu_node == page_node
            return known & (same if t == "local" else ~same)
        if t == "addr":
            lo, hi = self._range
            a = reports["addr"]
            return (a >= np.uint64(lo)) & (a < np.uint64(hi))
        col = _COLUMN[t]
        ids = self._ids
        if 0 < len(ids) <= 8:  # a probe per CPU or thread: np.isin costs ~13 us a call
            v = reports[col]
            m = v == ids[0]
            for x in ids[1:]:
                m |= v == x
            return m
        return np.isin(reports[col], np.asarray(ids, dtype=np.int64))

    def test_one(self, report) -> bool:
        """Scalar version of ``test`` used by the reference evaluator."""
        t = self.type
        if t in KERNEL_ONLY_TYPES:
            raise ValueError(f"filter type {t!r} is evaluated by the kernel's DAMON only")
        if t == "write":
            return bool(report["write"])
        if t == "read":
            return not bool(report["write"])
        if t in ("local", "remote"):
            cn, pn = int(report["node"]), int(report["page_node"])
            return cn >= 0 and pn >= 0 and ((cn == pn) == (t == "local"))
        if t == "addr":
            return self._range[0] <= int(report["addr"]) < self._range[1]
        col = _COLUMN[t]
        return int(report[col]) in self._ids

    # -- (de)serialisation -------------------------------------------------

    def to_dict(self) -> dict:
        return {"type": self.type, "value": self.value, "matching": self.matching,
                "allow": self.allow}

    @classmethod
    def from_dict(cls, d: dict) -> Filter:
        if not isinstance(d, dict):
            raise ValueError(f"a filter must be an object, got {type(d).__name__}")
        unknown = set(d) - {"type", "value", "matching", "allow"}
        if unknown:
            raise ValueError(f"unknown filter keys: {', '.join(sorted(unknown))}")
        for key in ("matching", "allow"):
            if key in d and not isinstance(d[key], bool):
                raise ValueError(f"filter {key!r} must be true or false")
        if "type" not in d:
            raise ValueError("a filter needs a 'type'")
        value = d.get("value")
        if value is not None and not isinstance(value, str):
            raise ValueError("filter 'value' must be a string or null")
        return cls(type=d["type"], value=value, matching=d.get("matching", True),
                   allow=d.get("allow", True))

    def describe(self) -> str:
        cond = self.type + (f":{self.value}" if self.value else "")
        return f"{'allow' if self.allow else 'reject'} {'' if self.matching else 'non-'}{cond}"


def evaluate(filters: Sequence[Filter], reports: np.ndarray) -> np.ndarray:
    """Vectorised ordered evaluation: a bool mask of the allowed reports."""
    n = reports.shape[0]
    if not filters:
        return np.ones(n, dtype=bool)
    if len(filters) == 1:  # a probe's one condition: it decides every report
        f = filters[0]
        hit = f.test(reports) == f.matching
        return hit if f.allow else ~hit
    allowed = np.full(n, not filters[-1].allow, dtype=bool)  # the default when none decides
    undecided = np.ones(n, dtype=bool)
    for f in filters:
        decides = undecided & (f.test(reports) == f.matching)
        allowed[decides] = f.allow
        undecided &= ~decides
        if not undecided.any():
            break
    return allowed


def evaluate_reference(filters: Sequence[Filter], report) -> bool:
    """The obviously-correct one-report evaluator the vectorised one is tested against."""
    for f in filters:
        if f.test_one(report) == f.matching:
            return f.allow
    if not filters:
        return True
    return not filters[-1].allow


def parse_conditions(text: str) -> list[Filter]:
    """``"cpus:0-3,!threads:42,write"`` -> ordered filters meaning "all of these hold".

    Each condition ``C`` becomes ``reject non-C``; ``!C`` becomes ``reject C``.
    Nothing decides for a report that satisfies every condition, and as the
    last filter rejects, it is allowed.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty filter (expected e.g. 'cpus:0-3,write')")
    if re.search(r"(^,|,\s*,|,$)", text):
        raise ValueError(f"empty condition in {text!r}")
    out: list[Filter] = []
    # Split on commas that start a new condition: a comma followed by an
    # optional '!' and a known type name.  This keeps kernel-style lists
    # such as 'cpus:0-3,8' working where unambiguous.
    names = "|".join(sorted(FILTER_TYPES, key=len, reverse=True))
    parts = re.split(rf",(?=\s*!?\s*(?:{names})(?::|\s*,|\s*$))", text)
    for part in parts:
        part = part.strip()
        negate = part.startswith("!")
        if negate:
            part = part[1:].strip()
        ftype, _, value = part.partition(":")
        ftype = ftype.strip()
        if not ftype:
            raise ValueError(f"empty condition in {text!r}")
        out.append(Filter(type=ftype, value=value.strip() or None, matching=negate, allow=False))
    return out


def conditions_text(filters: Sequence[Filter]) -> str:
    """Inverse of parse_conditions for lists it produced (for messages)."""
    parts = []
    for f in filters:
        cond = f.type + (f":{f.value}" if f.value else "")
        parts.append(("!" if f.matching else "") + cond if not f.allow else f.describe())
    return ",".join(parts)
