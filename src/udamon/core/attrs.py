"""Monitoring attributes, with DAMON's defaults and validation rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class IntervalsGoal:
    """DAMON's interval auto-tuning goal; ``aggrs == 0`` disables tuning (the default).

    Every ``aggrs`` aggregations the sampling interval is scaled so that the
    observed access events approach ``access_bp`` (basis points) of the
    maximum possible; the aggregation interval keeps its ratio to it.
    """

    access_bp: int = 0
    aggrs: int = 0
    min_sample_us: int = 0
    max_sample_us: int = 0

    @property
    def enabled(self) -> bool:
        return self.aggrs > 0 and self.access_bp > 0


@dataclass(frozen=True)
class Attrs:
    sample_us: int = 5_000
    aggr_us: int = 100_000
    update_us: int = 1_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1_000
    intervals_goal: IntervalsGoal = field(default_factory=IntervalsGoal)

    def validate(self) -> Attrs:
        """Raise ValueError with a one-line reason when the attributes make no sense."""
        if self.sample_us <= 0:
            raise ValueError("sampling interval must be positive")
        if self.aggr_us < self.sample_us:
            raise ValueError("aggregation interval must be at least the sampling interval")
        if self.aggr_us % self.sample_us:
            raise ValueError("aggregation interval must be a multiple of the sampling interval")
        if self.aggr_us // self.sample_us > 1 << 20:
            raise ValueError("aggregation interval must be at most 2^20 sampling intervals")
        if self.update_us < self.aggr_us:
            raise ValueError("update interval must be at least the aggregation interval")
        if self.min_nr_regions < 3:
            raise ValueError("min nr_regions must be at least 3 (DAMON's vaddr heuristics)")
        if self.max_nr_regions < self.min_nr_regions:
            raise ValueError("max nr_regions must be at least min nr_regions")
        g = self.intervals_goal
        if g.enabled:
            if not 0 < g.access_bp <= 10_000:
                raise ValueError("intervals goal access_bp must be in 1..10000")
            if not 0 < g.min_sample_us <= g.max_sample_us:
                raise ValueError("intervals goal needs 0 < min_sample_us <= max_sample_us")
        return self

    @property
    def aggr_samples(self) -> int:
        """Sampling intervals per aggregation: the maximum nr_accesses."""
        return self.aggr_us // self.sample_us

    def with_sample_us(self, sample_us: int) -> Attrs:
        """Auto-tuning: new sampling interval, same number of samples per aggregation."""
        return replace(self, sample_us=sample_us, aggr_us=sample_us * self.aggr_samples)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Attrs:
        d = dict(d)
        goal = IntervalsGoal(**d.pop("intervals_goal", {}))
        return cls(intervals_goal=goal, **d).validate()
