"""The writer's direct snapshot line is the text json.dumps writes of the snapshot's dict.

snapshot_line formats a region per %-format instead of building dicts for the
generic encoder; any difference (key order, escaping, an optional key) would be
a different record, so the two are compared on random snapshots (hypothesis),
names tables and thread deltas included.
"""

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from udamon.core.monitor import Snapshot
from udamon.record.snapshot_json import NamesWritten, snapshot_line, snapshot_to_json

names_st = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
u63 = st.integers(0, 2**63 - 1)


@st.composite
def snapshots(draw):
    n = draw(st.integers(0, 12))
    col = st.lists(u63, min_size=n, max_size=n)
    probe_names = draw(st.lists(names_st | st.sampled_from(["cpu:0", "100%", '"q"', "é"]),
                                max_size=4, unique=True))
    nodes = None
    if draw(st.booleans()):
        k = draw(st.integers(1, 3))
        nodes = np.asarray(draw(st.lists(st.lists(st.integers(0, 9), min_size=k, max_size=k),
                                         min_size=n, max_size=n)), dtype=np.int64).reshape(n, k)
    spans = st.lists(st.tuples(u63, u63), max_size=3)
    extra = draw(st.none() | st.dictionaries(st.sampled_from(["wss", "rate", "pid", "x%"]),
                                             st.integers() | st.floats(allow_nan=False)
                                             | names_st, max_size=2))
    t0 = draw(st.integers(0, 2**50))
    return Snapshot(
        t0 + draw(st.integers(0, 2**30)), t0, draw(st.integers(1, 2**22)),
        draw(st.integers(1, 2**20)),
        np.asarray(draw(col), dtype=np.uint64), np.asarray(draw(col), dtype=np.uint64),
        np.asarray(draw(col), dtype=np.int64), np.asarray(draw(col), dtype=np.int64),
        {p: np.asarray(draw(col), dtype=np.int64) for p in probe_names},
        draw(u63), draw(u63), page_nodes=nodes,
        numa=draw(st.none() | st.just({"local": 3, "remote": 1, "unknown": 0,
                                        "threads": {"12": [3, 1, 0]}})),
        names=draw(st.none() | st.lists(st.tuples(u63, u63, names_st), max_size=3)),
        threads=draw(st.none() | st.dictionaries(st.integers(1, 2**22), names_st, max_size=3)),
        written_pages=(np.asarray(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
                                  dtype=np.int64) if draw(st.booleans()) else None),
        mapped=draw(st.none() | spans), mergeable=draw(st.none() | spans), extra=extra)


@settings(max_examples=500, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=3))
def test_line_is_what_json_dumps_writes(snaps):
    w_line, w_dict = NamesWritten(), NamesWritten()
    for s in snaps:
        want = json.dumps(snapshot_to_json(s, w_dict), separators=(",", ":"))
        assert snapshot_line(s, w_line) == want
    assert snapshot_line(snaps[0]) == json.dumps(snapshot_to_json(snaps[0]),
                                                 separators=(",", ":"))
