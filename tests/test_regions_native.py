"""The C region walk (udamon.core._regions) gives what the numpy version gives.

Both run on the same random region lists and counters (hypothesis), with the
same random draws for splits; every array must come out equal.  Counters up to
2**40 and regions up to 2**36 bytes make the size-weighted products overflow 64
bits, which the C code takes in 128 (Python's integers in the numpy version).
"""

import copy
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udamon.core import regions as regions_mod
from udamon.core.regions import PAGE, Regions

pytestmark = pytest.mark.skipif(not regions_mod.native(),
                                reason="udamon.core._regions is not built")

FIELDS = ("start", "end", "nr_accesses", "last_nr_accesses", "age", "probe_hits",
          "written_pages")


def same(a: Regions, b: Regions) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype, f
        assert x.shape == y.shape, f
        assert np.array_equal(x, y), f


@st.composite
def region_lists(draw):
    n = draw(st.integers(1, 40))
    nprobes = draw(st.integers(0, 3))
    big = draw(st.booleans())
    hi = 2**40 if big else 30
    pages = draw(st.lists(st.integers(1, 2**24 if big else 64), min_size=n, max_size=n))
    gaps = draw(st.lists(st.sampled_from([0, 0, 0, 1, 5]), min_size=n, max_size=n))
    starts, ends, cur = [], [], 1 << 20
    for p, g in zip(pages, gaps, strict=True):
        cur += g * PAGE
        starts.append(cur)
        cur += p * PAGE
        ends.append(cur)
    r = Regions(starts, ends, nprobes)
    ints = st.lists(st.integers(0, hi), min_size=n, max_size=n)
    r.nr_accesses = np.asarray(draw(ints), dtype=np.int64)
    r.last_nr_accesses = np.asarray(draw(ints), dtype=np.int64)
    r.age = np.asarray(draw(ints), dtype=np.int64)
    r.written_pages = np.asarray(draw(ints), dtype=np.int64)
    r.probe_hits = np.asarray([draw(ints) for _ in range(nprobes)],
                              dtype=np.int64).reshape(nprobes, n)
    return r


@settings(max_examples=400, deadline=None)
@given(region_lists(), st.integers(0, 40), st.integers(1, 2**26),
       st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5), st.integers(0, 60)),
                max_size=2))
def test_merge_agrees(r, thres, limit_pages, weighted):
    weighted = [(p, w, th) for p, w, th in weighted if p < r.nr_probes]
    a, b = copy.deepcopy(r), copy.deepcopy(r)
    assert a._merge_c(thres, limit_pages * PAGE, weighted)
    b._merge_numpy(thres, limit_pages * PAGE, weighted)
    same(a, b)
    a.check_invariants()


@settings(max_examples=400, deadline=None)
@given(region_lists(), st.sampled_from([1, 2]), st.integers(0, 2**32 - 1),
       st.sampled_from([PAGE, 2 * PAGE, 1 << 20]))
def test_split_agrees(r, ncuts, seed, min_sz):
    rng = np.random.default_rng(seed)
    draws = [rng.integers(1, 10, size=len(r)) for _ in range(ncuts)]
    a, b = copy.deepcopy(r), copy.deepcopy(r)
    assert a._split_c(draws, min_sz)
    b._split_numpy(draws, min_sz)
    same(a, b)
    a.check_invariants()


@settings(max_examples=200, deadline=None)
@given(region_lists(), st.integers(0, 40))
def test_age_rule_agrees(r, thres):
    changed = (np.abs(r.nr_accesses - r.last_nr_accesses) > thres) | (
        (r.nr_accesses == 0) != (r.last_nr_accesses == 0))
    want = np.where(changed, 0, r.age + 1)
    r.update_ages(thres)
    assert np.array_equal(r.age, want)


def test_session_sequence_agrees_and_arrays_stay_usable():
    """A session's sequence (ages, merge, count into the merged arrays, split, reset)
    run with C and with numpy: the same regions after each aggregation, and the views
    the C version leaves behind take in-place counting like fresh arrays."""
    c = Regions.evenly_split([(1 << 30, (1 << 30) + 4096 * 3000)], 10, nr_probes=2)
    p = copy.deepcopy(c)
    rng_c, rng_p = np.random.default_rng(7), np.random.default_rng(7)
    data = np.random.default_rng(1)
    for _ in range(30):
        hits = data.integers(0, 20, size=len(c))
        for r, rng, use_c in ((c, rng_c, True), (p, rng_p, False)):
            r.nr_accesses += hits
            r.probe_hits[1] += hits // 2
            r.written_pages += hits % 3
            r.update_ages(2)
            if use_c:
                assert r._merge_c(2, 4096 * 600, [(1, 2, 3)])
            else:
                r._merge_numpy(2, 4096 * 600, [(1, 2, 3)])
            r.reset_aggregated()
            draws = [rng.integers(1, 10, size=len(r)) for _ in range(2)]
            if use_c:
                assert r._split_c(draws, PAGE)
            else:
                r._split_numpy(draws, PAGE)
        same(c, p)
        c.check_invariants()


def test_not_int64_falls_back():
    """An int32 counter array (not what C walks) takes the numpy path, same answer."""
    r = Regions([0, 4096, 8192], [4096, 8192, 12288])
    r.nr_accesses = np.asarray([1, 1, 9], dtype=np.int32)
    assert not r._merge_c(0, 1 << 30, None)
    r.merge(0, 1 << 30)
    assert r.start.tolist() == [0, 8192] and r.end.tolist() == [8192, 12288]


@settings(max_examples=200, deadline=None)
@given(region_lists())
def test_summary_agrees(r):
    assert r.summary() == (r.total_size(), int(r.nr_accesses.max(initial=0)))


@pytest.mark.skipif(os.geteuid() != 0, reason="wp attaches to another process: needs root")
def test_a_session_without_the_extensions_says_so_once(tmp_path, udamon):
    """UDAMON_PURE_PYTHON=1 stands for an install that could not build the extensions:
    the session runs (same algorithms in Python) and says so in one line; with them
    built it says nothing of the kind."""
    import subprocess

    from udamon.primitives import uffd_loop

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for pure in ("1", "0"):
            if pure == "0" and not uffd_loop.native():
                continue
            env = {**os.environ, "UDAMON_PURE_PYTHON": pure}
            p = udamon("record", "--primitive", "wp", "--pid", str(sleeper.pid), "--duration",
                       "1s", "-q", "-o", str(tmp_path / f"r{pure}.jsonl"), env=env)
            assert p.returncode == 0, p.stderr
            lines = [x for x in p.stderr.splitlines() if "without the C extension" in x]
            if pure == "1":
                assert len(lines) == 1, p.stderr
                assert "_regions" in lines[0] and "_uffd_loop" in lines[0], lines[0]
                assert "UDAMON_PURE_PYTHON=1" in lines[0]
            else:
                assert lines == [], p.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


@settings(max_examples=300, deadline=None)
@given(region_lists(), st.lists(st.tuples(st.integers(0, 2**21), st.integers(0, 5)),
                                max_size=300),
       st.sampled_from([0, 3, 10]), st.integers(1, 6))
def test_distinct_agrees(r, pairs, shift, width):
    """Distinct (page, column) keys per region: the hash set in C counts what numpy's
    sort counts, with pages inside, between and outside the regions, repeats, and
    columns past the width."""
    base = 1 << 20 >> 12  # the first region's page
    cols = [c & ((1 << shift) - 1) for _, c in pairs] if shift else [0] * len(pairs)
    keys = np.asarray([((base + p // 64) << shift) | c for (p, _), c in
                       zip(pairs, cols, strict=True)], dtype=np.uint64)
    keys = np.concatenate([keys, keys[::2]])  # repeats
    got = r.count_distinct(keys, shift, width)
    saved = regions_mod._native
    try:
        regions_mod._native = None
        want = r.count_distinct(keys, shift, width)
    finally:
        regions_mod._native = saved
    assert got.shape == want.shape == (len(r), width)
    assert got.dtype == want.dtype == np.int64
    assert np.array_equal(got, want)
