"""Parsing and formatting of durations, sizes and addresses for humans."""

from __future__ import annotations

import re

_DUR = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
        "m": 60_000_000_000, "min": 60_000_000_000, "h": 3_600_000_000_000}


def parse_duration_ns(text: str) -> int:
    """'5ms' -> 5_000_000.  A unit is required: durations mean different things in
    different places (DAMON speaks microseconds, people speak seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zµ]+)\s*", str(text))
    if not m or m.group(2) not in _DUR:
        raise ValueError(f"bad duration {text!r} (expected a number and a unit: "
                         "ns, us, ms, s, m, h; e.g. 5ms)")
    return int(round(float(m.group(1)) * _DUR[m.group(2)]))


def parse_duration_us(text: str) -> int:
    ns = parse_duration_ns(text)
    if ns % 1000:
        raise ValueError(f"duration {text!r} is not a whole number of microseconds")
    return ns // 1000


def fmt_duration_ns(ns: float) -> str:
    ns = float(ns)
    for unit, scale in (("h", 3.6e12), ("m", 6e10), ("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if abs(ns) >= scale:
            v = ns / scale
            return f"{v:.3g} {unit}" if v != int(v) else f"{int(v)} {unit}"
    return f"{int(ns)} ns"


def fmt_size(n: float) -> str:
    n = float(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.3g} {unit}" if v != int(v) else f"{int(v)} {unit}"
    return f"{int(n)} B"


_SIZE = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
         "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
         "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'64MiB' -> 67108864 (binary units; K/M/G/T and KB/MB... mean the same)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE:
        raise ValueError(f"bad size {text!r} (expected a number and a unit: B, KiB, MiB, GiB; "
                         "e.g. 64MiB)")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])


def parse_int(text: str) -> int:
    """Decimal or 0x-hex integer."""
    try:
        return int(str(text).strip(), 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (decimal or 0x-hex)") from None


def parse_range(text: str) -> tuple[int, int]:
    """'START-END' (decimal or 0x-hex) -> (start, end) with start < end."""
    m = re.fullmatch(r"\s*(\w+)\s*-\s*(\w+)\s*", str(text))
    if not m:
        raise ValueError(f"bad range {text!r} (expected START-END, e.g. 0x1000-0x5000)")
    start, end = parse_int(m.group(1)), parse_int(m.group(2))
    if not 0 <= start < end < 1 << 64:
        raise ValueError(f"bad range {text!r} (need 0 <= START < END < 2^64)")
    return start, end
