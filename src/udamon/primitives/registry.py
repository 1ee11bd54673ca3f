"""Which primitives exist, which this machine can run, and how to start a live one."""

from __future__ import annotations

from udamon.errors import UsageError

# name -> one-line description; order is preference for 'auto' among live ones
PRIMITIVES: dict[str, str] = {
    "replay": "recorded reports from a CSV file (--input)",
}
LIVE: list[str] = []


def names() -> list[str]:
    return ["auto", *PRIMITIVES]


def best_live() -> str:
    for name in LIVE:
        return name
    raise UsageError("no live primitive is available in this udamon yet; "
                     "use --primitive replay --input FILE")


def record_live(name, args, attrs, filters, probes, ranges, pids, command) -> int:
    raise UsageError(f"primitive {name!r} is not available")
