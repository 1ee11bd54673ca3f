"""QEMU's pre-copy live migration, as a model: will it converge, how long, what downtime.

Round 1 sends the guest's memory (the resident bytes: pages never touched are
zero, which QEMU sends as a flag, not as data).  Every next round sends what was
dirtied during the previous one, ``rate x round time`` (never more than the
memory itself).  QEMU stops the guest and sends the rest once what is left
could go within the downtime limit (``pending <= bandwidth x downtime-limit``,
migration/migration.c); the final downtime is that rest / bandwidth.  With a
dirty rate at or above the bandwidth the rest never shrinks: no convergence
(QEMU keeps iterating until auto-converge throttles the guest or the operator
gives up).  The 1 s-window rate stands for every round's rate, as QEMU's own
estimate does; for a random writer, distinct pages per second are somewhat
higher in rounds shorter than a second.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DOWNTIME_NS = 300_000_000  # QEMU's downtime-limit default
MAX_ROUNDS = 1000


@dataclass(frozen=True)
class PreCopy:
    converges: bool
    rounds: int  # rounds before the stop-and-copy (0 when not converging)
    total_ns: int  # until the guest runs on the destination (-1: never)
    downtime_ns: int  # the final stop-and-copy (-1: never)

    def to_dict(self) -> dict:
        return {"converges": self.converges, "rounds": self.rounds,
                "total_ns": self.total_ns, "downtime_ns": self.downtime_ns}


def estimate(memory_bytes: float, rate_bps: float, bandwidth_bps: float,
             downtime_ns: int = DEFAULT_DOWNTIME_NS) -> PreCopy:
    """The pre-copy of ``memory_bytes`` dirtied at ``rate_bps`` over ``bandwidth_bps``."""
    if bandwidth_bps <= 0:
        raise ValueError("bandwidth must be positive")
    threshold = bandwidth_bps * downtime_ns / 1e9
    pending = float(memory_bytes)
    total_s = 0.0
    rounds = 0
    while pending > threshold:
        if rounds >= MAX_ROUNDS or (rounds > 0 and rate_bps >= bandwidth_bps):
            return PreCopy(False, 0, -1, -1)
        t = pending / bandwidth_bps
        total_s += t
        rounds += 1
        pending = min(rate_bps * t, float(memory_bytes))
    down = pending / bandwidth_bps
    return PreCopy(True, rounds, int(round((total_s + down) * 1e9)), int(round(down * 1e9)))
