"""A probe: a name plus an ordered filter list; each region counts its hits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from udamon.probes.filters import Filter, parse_conditions

_NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")


@dataclass(frozen=True)
class Probe:
    """``weight`` (0: none) makes region adjustment follow the probe, as a DAMON probe's
    ``weight`` does since Linux 7.3: adjacent regions merge only when their weighted
    hits of every weighted probe are similar too (see docs/filters.md)."""

    name: str
    filters: tuple[Filter, ...] = field(default=())
    weight: int = 0

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"bad probe name {self.name!r} (1-64 of letters, digits and _ . : + -)"
            )
        if not isinstance(self.weight, int) or not 0 <= self.weight <= 1000:
            raise ValueError(f"bad weight {self.weight!r} for probe {self.name!r} "
                             "(a whole number 0..1000)")
        object.__setattr__(self, "filters", tuple(self.filters))

    @classmethod
    def parse(cls, spec: str) -> Probe:
        """``NAME=CONDITIONS`` as on the command line, e.g. ``w0=cpus:0,write``."""
        name, sep, conds = spec.partition("=")
        if not sep:
            raise ValueError(f"bad probe {spec!r} (expected NAME=FILTERS, e.g. w=write)")
        return cls(name.strip(), tuple(parse_conditions(conds)))

    def to_dict(self) -> dict:
        out = {"name": self.name, "filters": [f.to_dict() for f in self.filters]}
        if self.weight:
            out["weight"] = self.weight
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError("a probe must be an object with a 'name'")
        filters = d.get("filters", [])
        if not isinstance(filters, list):
            raise ValueError("probe 'filters' must be a list")
        weight = d.get("weight", 0)
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise ValueError("probe 'weight' must be a whole number")
        return cls(str(d["name"]), tuple(Filter.from_dict(f) for f in filters), weight)
