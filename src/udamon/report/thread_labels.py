"""Bounded label values for per-thread Prometheus metrics.

A process can have thousands of threads, and a Prometheus series per thread would
grow without bound (every label value is a series, kept by the server for as long
as it retains data).  At most ``cap`` threads of a target get their own ``tid`` and
``thread`` (comm) label values: the busiest when a slot is free (cumulative accesses
at each snapshot, ties by tid); once given, a thread keeps its labels for the session,
because a counter whose series moves would jump.  Every other thread is summed under
``tid="other", thread="other"``; reports whose thread is not known under
``tid="unknown", thread="unknown"``.  A thread whose name could not be read (it exited
first) has ``thread=""``.
"""

from __future__ import annotations

DEFAULT_CAP = 16
OTHER = ("other", "other")
UNKNOWN = ("unknown", "unknown")


class ThreadLabels:
    """Per target, which threads have their own labels (see the module docstring)."""

    def __init__(self, cap: int = DEFAULT_CAP):
        if cap < 0:
            raise ValueError("the thread label cap must be >= 0")
        self.cap = cap
        self._given: dict[int, dict[str, tuple[str, str]]] = {}  # pid -> tid -> labels
        self._seen: dict[int, dict[str, float]] = {}  # pid -> tid -> cumulative accesses

    def assign(self, pid: int, activity: dict[str, float],
               names: dict[int, str] | None) -> dict[str, tuple[str, str]]:
        """``activity``: this snapshot's accesses (> 0) per tid key ("<tid>", "other",
        "unknown"); returns each key's (tid, thread) label values."""
        given = self._given.setdefault(pid, {})
        seen = self._seen.setdefault(pid, {})
        for k, v in activity.items():
            seen[k] = seen.get(k, 0.0) + v
        fresh = sorted((k for k in activity if k.isdigit() and k not in given),
                       key=lambda k: (-seen[k], int(k)))
        for k in fresh[:max(self.cap - len(given), 0)]:
            given[k] = (k, (names or {}).get(int(k), ""))
        out = {}
        for k in activity:
            out[k] = given.get(k) or (UNKNOWN if k == "unknown" else OTHER)
        return out

    def labelled(self, pid: int) -> int:
        return len(self._given.get(pid, {}))
