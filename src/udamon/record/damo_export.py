"""Convert a udamon record into a record file of damo, DAMON's user-space tool.

Target: damo 3.4.3 (https://github.com/damonitor/damo), record file type
``json_compressed``: zlib-compressed JSON of a list of ``DamonRecord`` key-value
pairs, exactly what ``damo record`` writes (``_damo_records.write_json_compressed``,
i.e. ``DamonRecord.to_kvpairs(raw=True)``) and what ``damo report access``,
``damo report heatmap`` and ``damo report wss`` read with ``-i FILE``.  Plain
``json`` is also offered, but damo 3.4.3 recognises a file's type with
``file -b`` and accepts JSON only when it says exactly ``JSON data``; ``file``
5.44 (Debian 12) says ``JSON text data`` and damo then tries ``perf script`` on
it and fails, so ``json_compressed`` (``zlib compressed data``) is the default.
Either way damo needs the ``file`` command installed.

Mapping, one ``DamonRecord`` per target pid (in the record's pid order)::

    kdamond_idx 0, context_idx 0, scheme_idx null, scheme_filters [],
    target_id   the pid,
    intervals   the header's sample/aggr/update interval and intervals goal,
    data_source "unknown" (damo's value for recorded monitoring results),
    snapshots   one per udamon snapshot of that pid, in time order:
                start_time / end_time (ns, the record's clock), total_bytes,
                damos_stats null, sample_interval_us (the snapshot's own, for
                interval auto-tuning),
    regions     start, end, nr_accesses {"samples": nr_accesses, "percent": null}
                (damo derives the percent), age {"usec": null,
                "aggr_intervals": age}, probe_hits (one count per probe, in the
                header's probe order), sz_filter_passed 0.

Dropped, because damo's record has no place for it: probe names and probe and
sample filter definitions (the counts are kept, by position), per-region page
NUMA nodes, ``nr_reports``/``nr_passed``, the primitive and coverage (so damo
cannot know that nr_accesses 0 of the ``hint`` primitive means "not observed"),
target names and ranges, the end line, and snapshots with no regions.
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict

from udamon.core.monitor import Snapshot
from udamon.record.reader import Record

DAMO_VERSION = "3.4.3"
FILE_TYPES = ("json_compressed", "json")
DEFAULT_FILE_TYPE = "json_compressed"


def _n(v) -> str:
    """A number the way damo's raw form writes it ('%d')."""
    return str(int(v))


def _intervals(rec: Record) -> OrderedDict:
    a = rec.attrs
    g = a.intervals_goal
    on = g.enabled
    # damo tunes (and reads per-snapshot sample intervals) iff aggrs != 0
    goal = OrderedDict([("access_bp", f"{g.access_bp if on else 0:f}"),
                        ("aggrs", _n(g.aggrs if on else 0)),
                        ("min_sample_us", _n(g.min_sample_us if on else 0)),
                        ("max_sample_us", _n(g.max_sample_us if on else 0))])
    return OrderedDict([("sample_us", _n(a.sample_us)), ("aggr_us", _n(a.aggr_us)),
                        ("ops_update_us", _n(a.update_us)), ("intervals_goal", goal)])


def _snapshot(s: Snapshot, probe_names: list[str]) -> OrderedDict:
    hits = [s.probe_hits[n].tolist() if n in s.probe_hits else [0] * len(s.start)
            for n in probe_names]
    regions = []
    for i, (st, en, acc, age) in enumerate(zip(s.start.tolist(), s.end.tolist(),
                                                s.nr_accesses.tolist(), s.age.tolist(),
                                                strict=True)):
        regions.append(OrderedDict([
            ("start", _n(st)), ("end", _n(en)),
            ("nr_accesses", OrderedDict([("samples", int(acc)), ("percent", None)])),
            ("age", OrderedDict([("usec", None), ("aggr_intervals", _n(age))])),
            ("probe_hits", [int(h[i]) for h in hits]),
            ("sz_filter_passed", "0"),
        ]))
    total = int((s.end - s.start).sum()) if len(s.start) else 0
    return OrderedDict([
        ("start_time", _n(s.start_ns)), ("end_time", _n(s.time_ns)),
        ("regions", regions), ("total_bytes", _n(total)), ("damos_stats", None),
        ("sample_interval_us", _n(s.sample_us)),
    ])


def to_damo_records(rec: Record, pid: int | None = None) -> list[OrderedDict]:
    """The damo ``DamonRecord`` key-value pairs (raw form) of ``rec``: one per target
    (only ``pid``'s when given) that has at least one snapshot with regions."""
    intervals = _intervals(rec)
    names = rec.probe_names
    out = []
    for p in rec.pids:
        if pid is not None and p != pid:
            continue
        snaps = sorted((s for s in rec.snapshots_of(p) if len(s.start)),
                       key=lambda s: (s.start_ns, s.time_ns))
        if not snaps:
            continue
        out.append(OrderedDict([
            ("kdamond_idx", 0), ("context_idx", 0), ("intervals", intervals),
            ("scheme_idx", None), ("target_id", p), ("scheme_filters", []),
            ("snapshots", [_snapshot(s, names) for s in snaps]),
            ("data_source", "unknown"),
        ]))
    return out


def to_damo_bytes(rec: Record, pid: int | None = None,
                  file_type: str = DEFAULT_FILE_TYPE) -> bytes:
    """The bytes of a damo record file (``file_type`` json_compressed or json)."""
    if file_type not in FILE_TYPES:
        raise ValueError(f"damo file type must be one of {', '.join(FILE_TYPES)}")
    data = json.dumps(to_damo_records(rec, pid), indent=4).encode()
    return zlib.compress(data) if file_type == "json_compressed" else data
