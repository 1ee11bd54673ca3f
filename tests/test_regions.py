"""Region list invariants under DAMON's adjustments (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from udamon.core.regions import PAGE, Regions
from udamon.targets.procmaps import Vma, three_regions


def ranges_st(max_n=4):
    """Sorted, non-overlapping, page-aligned ranges."""
    return st.lists(st.tuples(st.integers(0, 64), st.integers(1, 64)), min_size=1,
                    max_size=max_n).map(_to_ranges)


def _to_ranges(pairs):
    out, cur = [], 0
    for gap, size in pairs:
        s = cur + gap * PAGE
        e = s + size * PAGE
        out.append((s, e))
        cur = e
    return out


def covered(r: Regions):
    """The union of the regions as coalesced ranges."""
    out = []
    for s, e in zip(r.start.tolist(), r.end.tolist(), strict=True):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def coalesce(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


@settings(max_examples=300, deadline=None)
@given(ranges_st(), st.integers(3, 50), st.integers(0, 2**32 - 1),
       st.lists(st.sampled_from(["split2", "split3", "merge", "count"]), max_size=12))
def test_adjustments_keep_invariants(ranges, min_nr, seed, ops):
    rng = np.random.default_rng(seed)
    r = Regions.evenly_split(ranges, min_nr, nr_probes=2)
    total = sum(e - s for s, e in ranges)
    for op in ops:
        if op == "split2":
            r.split(2, rng)
        elif op == "split3":
            r.split(3, rng)
        elif op == "merge":
            r.merge(int(rng.integers(0, 5)), total)
        else:
            r.nr_accesses = rng.integers(0, 20, len(r))
            r.probe_hits = rng.integers(0, 20, (2, len(r)))
        r.check_invariants()
        assert r.total_size() == total  # size is conserved
        assert covered(r) == coalesce(ranges)  # exactly the target ranges, no more
        assert r.probe_hits.shape == (2, len(r))
        assert np.all(r.sizes() % PAGE == 0)


@settings(max_examples=300, deadline=None)
@given(ranges_st(), ranges_st(), st.integers(3, 30), st.integers(0, 2**32 - 1))
def test_set_ranges_follows_new_ranges(old, new, min_nr, seed):
    r = Regions.evenly_split(old, min_nr, nr_probes=1)
    r.split(3, np.random.default_rng(seed))
    r.nr_accesses = np.arange(len(r))
    r.set_ranges(new)
    r.check_invariants()
    assert covered(r) == coalesce(new)


def test_set_ranges_keeps_counters_of_surviving_regions():
    r = Regions([0x1000, 0x5000, 0x9000], [0x5000, 0x9000, 0xD000])
    r.age[:] = [7, 8, 9]
    r.set_ranges([(0x5000, 0xD000), (0x20000, 0x21000)])
    assert r.start.tolist() == [0x5000, 0x9000, 0x20000]
    assert r.age.tolist() == [8, 9, 0]  # survivors keep their age; the new region starts at 0


def test_merge_is_size_weighted_and_bounded():
    r = Regions([0, 0x1000, 0x4000], [0x1000, 0x4000, 0x5000])
    r.nr_accesses[:] = [10, 6, 30]
    r.age[:] = [4, 8, 1]
    r.merge(thres=4, sz_limit=1 << 30)
    assert r.start.tolist() == [0, 0x4000]
    assert r.nr_accesses.tolist() == [(10 * 1 + 6 * 3) // 4, 30]
    assert r.age.tolist() == [(4 * 1 + 8 * 3) // 4, 1]
    r2 = Regions([0, 0x1000], [0x1000, 0x2000])
    r2.merge(thres=100, sz_limit=0x1000)  # would exceed the size limit
    assert len(r2) == 2


def test_age_rule():
    r = Regions([0, 0x1000, 0x2000, 0x3000], [0x1000, 0x2000, 0x3000, 0x4000])
    r.last_nr_accesses[:] = [5, 5, 0, 3]
    r.nr_accesses[:] = [5, 9, 0, 0]
    r.age[:] = [3, 3, 3, 3]
    r.update_ages(thres=2)
    # unchanged -> older; changed by more than thres -> 0; 0 <-> non-zero -> 0
    assert r.age.tolist() == [4, 0, 4, 0]


def test_index_of():
    r = Regions([0x1000, 0x3000], [0x2000, 0x4000])
    got = r.index_of(np.array([0, 0x1000, 0x1FFF, 0x2000, 0x3800, 0x4000], dtype=np.uint64))
    assert got.tolist() == [-1, 0, 0, -1, 1, -1]


def test_three_regions_cuts_the_two_biggest_gaps():
    def v(s, e, path=""):
        return Vma(s, e, "rw-p", 0, 0, path)
    vmas = [v(0x400000, 0x401000), v(0x402000, 0x500000, "[heap]"),
            v(0x7f0000000000, 0x7f0000100000), v(0x7f0000200000, 0x7f0000300000),
            v(0x7ffff0000000, 0x7ffff0021000, "[stack]"),
            v(0xffffffffff600000, 0xffffffffff601000, "[vsyscall]")]
    assert three_regions(vmas) == [(0x400000, 0x500000), (0x7f0000000000, 0x7f0000300000),
                                   (0x7ffff0000000, 0x7ffff0021000)]


def _reference_merge(r: Regions, thres: int, sz_limit: int) -> list[tuple]:
    """damon_merge_regions_of written out as the kernel does it: one region at a time,
    each into the merged one before it, integer division at every step."""
    out: list[list] = []
    for i in range(len(r)):
        s, e = int(r.start[i]), int(r.end[i])
        row = [s, e, int(r.nr_accesses[i]), int(r.age[i]), int(r.last_nr_accesses[i]),
               [int(h[i]) for h in r.probe_hits], int(r.written_pages[i])]
        if out:
            p = out[-1]
            sp, sz = p[1] - p[0], e - s
            if p[1] == s and abs(p[2] - row[2]) <= thres and sp + sz <= sz_limit:
                tot = sp + sz
                p[2] = (p[2] * sp + row[2] * sz) // tot
                p[3] = (p[3] * sp + row[3] * sz) // tot
                p[4] = (p[4] * sp + row[4] * sz) // tot
                p[5] = [(a * sp + b * sz) // tot for a, b in zip(p[5], row[5], strict=True)]
                p[6] += row[6]
                p[1] = e
                continue
        out.append(row)
    return [tuple(x[:5]) + (tuple(x[5]), x[6]) for x in out]


@given(n=st.integers(2, 40), probes=st.integers(0, 3), thres=st.integers(0, 5),
       limit_pages=st.integers(2, 200), seed=st.integers(0, 2**31))
@settings(max_examples=300, deadline=None)
def test_merge_matches_the_kernels_sequential_merge(n, probes, thres, limit_pages, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 20, n) * PAGE
    gaps = np.where(rng.random(n) < 0.2, PAGE, 0)  # some regions are not adjacent
    starts = np.cumsum(gaps + np.concatenate(([0], sizes[:-1])))
    r = Regions(starts, starts + sizes, probes)
    r.nr_accesses = rng.integers(0, 8, n)
    r.age = rng.integers(0, 50, n)
    r.last_nr_accesses = rng.integers(0, 8, n)
    r.probe_hits = rng.integers(0, 20, (probes, n))
    r.written_pages = rng.integers(0, 5, n)
    want = _reference_merge(r, thres, limit_pages * PAGE)
    r.merge(thres, limit_pages * PAGE)
    got = [(int(r.start[i]), int(r.end[i]), int(r.nr_accesses[i]), int(r.age[i]),
            int(r.last_nr_accesses[i]), tuple(int(h[i]) for h in r.probe_hits),
            int(r.written_pages[i])) for i in range(len(r))]
    assert got == want


@given(ranges=ranges_st(6), subs=st.sampled_from([2, 3]), seed=st.integers(0, 2**31))
@settings(max_examples=300, deadline=None)
def test_split_cuts_as_damon_split_regions_of(ranges, subs, seed):
    """Every region becomes 1..subs pieces covering it exactly, each piece keeps the
    region's counters, and the cuts fall on 10%..90% of the (remaining) size."""
    r = Regions([s for s, _ in ranges], [e for _, e in ranges], 1)
    r.nr_accesses = np.arange(len(r), dtype=np.int64) + 1
    r.probe_hits[0] = r.nr_accesses * 10
    before = list(zip(r.start.tolist(), r.end.tolist(), strict=True))
    r.split(subs, np.random.default_rng(seed))
    r.check_invariants()
    assert covered(r) == coalesce(before)
    for i, (s, e) in enumerate(before):
        inside = [(a, b) for a, b in zip(r.start.tolist(), r.end.tolist(), strict=True)
                  if s <= a and b <= e]
        assert inside[0][0] == s and inside[-1][1] == e and 1 <= len(inside) <= subs
        if e - s <= 2 * PAGE:
            assert len(inside) == 1  # too small to split
        if len(inside) >= 2:  # the last cut: 10%..90% of the region
            cut = inside[-1][0]
            assert s + (e - s) // 10 - PAGE < cut < s + 9 * (e - s) // 10 + PAGE
        idx = r.index_of(np.asarray([a for a, _ in inside], dtype=np.uint64))
        assert set(r.nr_accesses[idx].tolist()) == {i + 1}
        assert set(r.probe_hits[0][idx].tolist()) == {(i + 1) * 10}
