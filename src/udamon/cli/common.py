"""Argument parsing pieces shared by the subcommands."""

from __future__ import annotations

import argparse
import re
import sys

from udamon.core.attrs import Attrs, IntervalsGoal
from udamon.errors import InputError, UsageError
from udamon.probes.filters import FILTER_TYPES, Filter, parse_conditions
from udamon.probes.probe import Probe
from udamon.units import (
    parse_duration_ns,
    parse_duration_us,
    parse_positive_duration_us,
    parse_range,
)


class Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line and exit code 2.

    A value that starts with '-' and a digit ('--duration -5s', '--seed -1') is a
    value, so that its own check can say what is wrong with it; plain argparse takes
    '-5s' for an option and says "expected one argument" (Python 3.13 does the same
    as here).  No udamon option starts with a digit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def typed(fn, what: str):
    """Wrap a parser so argparse reports a ValueError's own message."""

    def conv(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = what
    return conv


FILTER_HELP = (
    "FILTERS are comma-separated conditions that must all hold, each [!]TYPE[:VALUE]:\n"
    + "\n".join(f"  {t:<8} {d}" for t, (_, d) in FILTER_TYPES.items())
    + "\nIn a list of ids inside FILTERS, separate ids with '+' (cpus:0+2) or use ranges"
    " (cpus:0-3)."
)


def add_monitoring_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("monitoring attributes (DAMON's; defaults as in the kernel)")
    g.add_argument("--sample", metavar="DUR", type=typed(parse_positive_duration_us, "duration"),
                   default=None, help="sampling interval (default 5ms)")
    g.add_argument("--aggr", metavar="DUR", type=typed(parse_positive_duration_us, "duration"),
                   default=None, help="aggregation interval (default 100ms)")
    g.add_argument("--update", metavar="DUR", type=typed(parse_positive_duration_us, "duration"),
                   default=None,
                   help="how often to follow the target's memory map changes (default 1s, "
                        "or the aggregation interval when that is longer)")
    g.add_argument("--regions", metavar="MIN,MAX", type=typed(_parse_minmax, "MIN,MAX"),
                   default=(10, 1000), help="min and max number of regions (default 10,1000)")
    g.add_argument("--intervals-goal", metavar="BP,AGGRS,MIN,MAX",
                   type=typed(_parse_goal, "BP,AGGRS,MIN,MAX"), default=None,
                   help="auto-tune the intervals toward BP basis points of accesses observed, "
                        "every AGGRS aggregations, sampling interval within MIN..MAX "
                        "(e.g. 400,3,5ms,10s, DAMON's suggestion); off by default, and BP or "
                        "AGGRS 0 turns it off (as in the kernel)")
    g.add_argument("--seed", type=typed(_seed, "seed"), default=None,
                   help="seed for region splitting and page sampling (reproducible runs)")


def add_filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "sample filters (only reports that pass them count in nr_accesses) and probes")
    g.add_argument("--cpus", metavar="LIST", help="only accesses made by these CPUs (e.g. 0-3,8)")
    g.add_argument("--write-only", action="store_true", help="only writes")
    g.add_argument("--tids", metavar="LIST", help="only accesses made by these thread ids")
    g.add_argument("--filter", metavar="FILTERS", action="append", default=[],
                   help="more sample-filter conditions (repeatable; all must hold)")
    g.add_argument("--probe", metavar="NAME=FILTERS", action="append", default=[],
                   help="add a per-region counter of the reports passing FILTERS "
                        "(repeatable), e.g. --probe w1=cpus:1,write")
    g.add_argument("--probe-weight", metavar="NAME=W", action="append", default=[],
                   help="make region adjustment follow probe NAME (a --probe or --breakdown "
                        "probe), as a DAMON probe's weight does: adjacent regions merge only "
                        "when their W-weighted hits are similar too (W 0..1000; repeatable)")
    g.add_argument("--regions-follow-origin", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="give the node and numa breakdown probes weight 1, so that equally "
                        "hot neighbours used from different nodes, or locally and remotely, "
                        "end up in different regions (default: on with --breakdown node or "
                        "numa)")


def attrs_from_args(a: argparse.Namespace, sample_us: int = 5_000,
                    aggr_us: int = 100_000) -> Attrs:
    """Attributes from the options; ``sample_us``/``aggr_us`` are the defaults of the
    chosen primitive (DAMON's unless measured otherwise)."""
    goal = IntervalsGoal() if a.intervals_goal is None else a.intervals_goal
    sample = a.sample if a.sample is not None else sample_us
    # without --aggr: the primitive's default, rounded to a whole number of samples
    aggr = a.aggr if a.aggr is not None else max(round(aggr_us / sample), 1) * sample
    update = a.update if a.update is not None else max(1_000_000, aggr)
    try:
        return Attrs(sample_us=sample, aggr_us=aggr, update_us=update,
                     min_nr_regions=a.regions[0], max_nr_regions=a.regions[1],
                     intervals_goal=goal).validate()
    except ValueError as e:
        raise UsageError(str(e)) from None


def filters_from_args(a: argparse.Namespace) -> list[Filter]:
    # (how the user wrote it, the condition): errors name the option that was given
    conds: list[tuple[str, str]] = []
    for opt, ftype, what in (("cpus", "cpus", "CPU"), ("tids", "threads", "thread id")):
        text = getattr(a, opt)
        if text is None:
            continue
        if not text.strip():  # an empty list would silently filter nothing
            raise UsageError(f"--{opt} needs at least one {what}")
        conds.append((f"--{opt} {text!r}", f"{ftype}:" + text.replace(",", "+")))
    if a.write_only:
        conds.append(("--write-only", "write"))
    conds.extend((repr(c), c) for c in a.filter)
    out: list[Filter] = []
    for shown, c in conds:
        try:
            out.extend(parse_conditions(c))
        except ValueError as e:
            raise UsageError(f"bad filter {shown}: {e}") from None
    return out


def probes_from_args(a: argparse.Namespace) -> list[Probe]:
    out: list[Probe] = []
    for spec in a.probe:
        try:
            out.append(Probe.parse(spec))
        except ValueError as e:
            raise UsageError(f"bad --probe {spec!r}: {e}") from None
    names = [p.name for p in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"probe names must be unique: {', '.join(sorted(dup))} given twice")
    return out


def probe_weights(a: argparse.Namespace) -> dict[str, int]:
    """--probe-weight NAME=W options as {name: weight}."""
    out: dict[str, int] = {}
    for spec in getattr(a, "probe_weight", []):
        name, sep, w = spec.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            weight = int(w)
            if not 0 <= weight <= 1000:
                raise ValueError
        except ValueError:
            raise UsageError(f"bad --probe-weight {spec!r} (expected NAME=W, W a whole number "
                             "0..1000)") from None
        out[name.strip()] = weight
    return out


def weigh_probes(probes: list[Probe], weights: dict[str, int]) -> list[Probe]:
    """The probes with the --probe-weight weights; a name that is no probe is bad usage."""
    import dataclasses

    unknown = set(weights) - {p.name for p in probes}
    if unknown:
        raise UsageError(f"--probe-weight: no probe named {', '.join(sorted(unknown))} "
                         f"(probes: {', '.join(p.name for p in probes) or 'none'})")
    return [dataclasses.replace(p, weight=weights[p.name]) if p.name in weights else p
            for p in probes]


def _whole_number(text: str, bound: str = "") -> int:
    """int(text), or the ValueError an option's user reads (``bound``: e.g. " >= 0")."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number{bound}, got {text!r}") from None


def _seed(text: str) -> int:
    """numpy's generators take seeds >= 0 only."""
    v = _whole_number(text, " >= 0")
    if v < 0:
        raise ValueError(f"the seed must be >= 0, got {v}")
    return v


def _parse_minmax(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"expected MIN,MAX, got {text!r}")
    try:
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"expected two integers MIN,MAX, got {text!r}") from None
    return lo, hi


def _parse_goal(text: str) -> IntervalsGoal:
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"expected BP,AGGRS,MIN,MAX (e.g. 400,3,5ms,10s), got {text!r}")
    try:
        bp, aggrs = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"BP and AGGRS must be integers in {text!r}") from None
    if bp < 0 or aggrs < 0:
        raise ValueError(f"BP and AGGRS must be >= 0 (0 turns tuning off) in {text!r}")
    return IntervalsGoal(bp, aggrs, parse_duration_us(parts[2]), parse_duration_us(parts[3]))


def parse_ranges(texts: list[str]) -> list[tuple[int, int]] | None:
    if not texts:
        return None
    out = []
    for t in texts:
        try:
            out.append(parse_range(t))
        except ValueError as e:
            raise UsageError(f"bad --range: {e}") from None
    out.sort()
    for (s0, e0), (s1, _) in zip(out[:-1], out[1:], strict=False):
        if s1 < e0:
            raise UsageError(f"--range values overlap ({s0:#x}-{e0:#x} and {s1:#x}-...)")
    return out


def duration_arg(text: str) -> int:
    if text.strip().startswith("-"):
        raise ValueError(f"duration must be positive, got {text!r}")
    ns = parse_duration_ns(text)
    if ns <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return ns


def positive_int(text: str) -> int:
    """A count of at least 1 (pages, rows): the argparse type of such options."""
    v = _whole_number(text)
    if v < 1:
        raise ValueError("must be at least 1")
    return v


def pid_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a process id") from None
        if not 0 < v < 1 << 31:  # pid_t is 32-bit: larger ones cannot exist
            raise ValueError(f"{v} is not a process id")
        out.append(v)
    return out


def open_record(path: str, pid: int | None = None, salvage: bool = False):
    """Read a record for a subcommand: check --pid, warn (one line) when the record is
    incomplete.  Errors are InputError/UsageError, i.e. one line and exit 2."""
    from udamon.errors import RecordDamaged
    from udamon.record.reader import read_record

    try:
        rec = read_record(path, salvage=salvage)
    except RecordDamaged as e:  # the library's words for it, with the option that helps
        hint = ("; --salvage reads what is there" if e.counted else
                f" ({e.intact} snapshots before it are intact; --salvage reads them)"
                if e.intact else "")
        raise InputError(e.message + hint) from None
    if pid is not None and pid not in rec.pids:
        raise UsageError(f"--pid {pid} is not a target of {path} "
                         f"(targets: {', '.join(map(str, rec.pids)) or 'none'})")
    if not rec.complete:
        print(f"udamon: warning: {path} is incomplete (no end line); "
              "udamon was stopped before it finished", file=sys.stderr)
    elif rec.damage:
        print(f"udamon: warning: {rec.damage}; reading what is there (--salvage)",
              file=sys.stderr)
    return rec
