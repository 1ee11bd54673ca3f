"""A probe: a name plus an ordered filter list; each region counts its hits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from udamon.probes.filters import Filter, parse_conditions

_NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")


@dataclass(frozen=True)
class Probe:
    name: str
    filters: tuple[Filter, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"bad probe name {self.name!r} (1-64 of letters, digits and _ . : + -)"
            )
        object.__setattr__(self, "filters", tuple(self.filters))

    @classmethod
    def parse(cls, spec: str) -> Probe:
        """``NAME=CONDITIONS`` as on the command line, e.g. ``w0=cpus:0,write``."""
        name, sep, conds = spec.partition("=")
        if not sep:
            raise ValueError(f"bad probe {spec!r} (expected NAME=FILTERS, e.g. w=write)")
        return cls(name.strip(), tuple(parse_conditions(conds)))

    def to_dict(self) -> dict:
        return {"name": self.name, "filters": [f.to_dict() for f in self.filters]}

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError("a probe must be an object with a 'name'")
        filters = d.get("filters", [])
        if not isinstance(filters, list):
            raise ValueError("probe 'filters' must be a list")
        return cls(str(d["name"]), tuple(Filter.from_dict(f) for f in filters))
