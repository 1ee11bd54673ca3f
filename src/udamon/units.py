"""Parsing and formatting of durations, sizes and addresses for humans."""

from __future__ import annotations

import math
import re

_DUR = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
        "m": 60_000_000_000, "min": 60_000_000_000, "h": 3_600_000_000_000}


def parse_duration_ns(text: str) -> int:
    """'5ms' -> 5_000_000.  A unit is required: durations mean different things in
    different places (DAMON speaks microseconds, people speak seconds)."""
    if str(text).strip().startswith("-"):
        raise ValueError(f"bad duration {text!r}: a duration cannot be negative")
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zµ]+)\s*", str(text), re.ASCII)
    if not m or m.group(2) not in _DUR:
        raise ValueError(f"bad duration {text!r} (expected a number and a unit: "
                         "ns, us, ms, s, m, h; e.g. 5ms)")
    ns = _exact(m.group(1), _DUR[m.group(2)], round_half=True)
    if ns > MAX_DURATION_NS:
        raise ValueError(f"bad duration {text!r}: longer than a 64-bit nanosecond clock "
                         "holds (about 292 years)")
    return ns


MAX_DURATION_NS = (1 << 63) - 1
MAX_SIZE = (1 << 64) - 1


def _exact(number: str, unit: int, *, round_half: bool = False) -> int:
    """``number`` (decimal digits, maybe a fraction) times ``unit``, computed exactly
    (a float overflows to infinity on long digit strings, and loses bits on big ones);
    rounded to nearest, else truncated.  Digit strings longer than 40 are refused."""
    whole, _, frac = number.partition(".")
    if len(whole) + len(frac) > 40:
        raise ValueError(f"a number with {len(whole) + len(frac)} digits is too long")
    num = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
    den = 10 ** len(frac)
    q, r = divmod(num * unit, den)
    return q + (1 if round_half and 2 * r >= den else 0)


def parse_duration_us(text: str) -> int:
    ns = parse_duration_ns(text)
    if ns % 1000:
        raise ValueError(f"duration {text!r} is not a whole number of microseconds")
    return ns // 1000


def parse_positive_duration_us(text: str) -> int:
    """An interval that must elapse ('0ms' would divide by zero or never advance)."""
    us = parse_duration_us(text)
    if us <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return us


def fmt_num(v: float) -> str:
    """About three significant digits, never scientific notation: 0.0123, 2.25, 41.6,
    512, 1000 (numbers of 1000 and more keep all their integer digits)."""
    a = abs(v)
    if a == 0 or not math.isfinite(a):
        return f"{v:g}"
    if a < 1:
        text = f"{v:.{2 - math.floor(math.log10(a))}f}"
    else:
        text = f"{v:.2f}" if a < 10 else f"{v:.1f}" if a < 100 else f"{v:.0f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _scaled(x: float, units: tuple[tuple[str, float], ...]) -> str:
    """``x`` in the largest unit (ascending ``units``) it reaches; a value that rounds
    up to the next unit is shown in that unit (1023.7 KiB -> 1 MiB, never 1024 KiB)."""
    sign = "-" if x < 0 else ""
    x = abs(x)
    i = 0
    while i + 1 < len(units) and x >= units[i + 1][1]:
        i += 1
    text = fmt_num(x / units[i][1])
    while i + 1 < len(units) and float(text) * units[i][1] >= units[i + 1][1]:
        i += 1
        text = fmt_num(x / units[i][1])
    return f"{sign}{text} {units[i][0]}"


_DUR_UNITS = (("ns", 1.0), ("us", 1e3), ("ms", 1e6), ("s", 1e9), ("m", 6e10), ("h", 3.6e12))
_SIZE_UNITS = tuple((u, float(1 << (10 * i)))
                    for i, u in enumerate(("B", "KiB", "MiB", "GiB", "TiB", "PiB")))


def fmt_duration_ns(ns: float) -> str:
    """'1.5 s', '100 ms', '2 m'; nanoseconds are whole."""
    ns = float(ns)
    if not math.isfinite(ns):
        return f"{ns} ns"
    if abs(round(ns)) < 1000:
        return f"{round(ns)} ns"
    return _scaled(ns, _DUR_UNITS[1:])


def fmt_size(n: float) -> str:
    """'4 KiB', '41.6 MiB', '1000 KiB', '2.5 TiB': binary units up to PiB; bytes are
    whole."""
    n = float(n)
    if not math.isfinite(n):
        return f"{n} B"
    if abs(round(n)) < 1024:
        return f"{round(n)} B"
    return _scaled(n, _SIZE_UNITS[1:])


_SIZE = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
         "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
         "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'64MiB' -> 67108864 (binary units; K/M/G/T and KB/MB... mean the same)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text), re.ASCII)
    if not m or m.group(2).lower() not in _SIZE:
        raise ValueError(f"bad size {text!r} (expected a number and a unit: B, KiB, MiB, GiB; "
                         "e.g. 64MiB)")
    size = _exact(m.group(1), _SIZE[m.group(2).lower()])
    if size > MAX_SIZE:
        raise ValueError(f"bad size {text!r}: larger than 2^64 bytes")
    return size


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
