"""Per-target region list and DAMON's region adjustment (mm/damon/core.c).

Regions are kept in parallel numpy arrays sorted by address, non-overlapping.
Merging and splitting walk the list once per aggregation in Python: the list
is bounded by max_nr_regions, which is what keeps DAMON's overhead bounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAGE = 4096


def align_down(x: int, a: int) -> int:
    return x - x % a


def align_up(x: int, a: int) -> int:
    return -(-x // a) * a


class Regions:
    """Sorted, non-overlapping ``[start, end)`` regions of one target with their counters."""

    __slots__ = ("start", "end", "nr_accesses", "last_nr_accesses", "age", "probe_hits",
                 "written_pages")

    def __init__(self, starts: Sequence[int], ends: Sequence[int], nr_probes: int = 0):
        self.start = np.asarray(starts, dtype=np.uint64).copy()
        self.end = np.asarray(ends, dtype=np.uint64).copy()
        n = self.start.size
        self.nr_accesses = np.zeros(n, dtype=np.int64)
        self.last_nr_accesses = np.zeros(n, dtype=np.int64)
        self.age = np.zeros(n, dtype=np.int64)
        self.probe_hits = np.zeros((nr_probes, n), dtype=np.int64)
        # distinct pages written in this aggregation (observational primitives): a sum,
        # not a per-sampling-interval count, so merging adds it instead of averaging
        self.written_pages = np.zeros(n, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.start.size)

    @property
    def nr_probes(self) -> int:
        return int(self.probe_hits.shape[0])

    def sizes(self) -> np.ndarray:
        return self.end - self.start

    def total_size(self) -> int:
        return int(self.sizes().sum())

    # -- construction ------------------------------------------------------

    @classmethod
    def evenly_split(cls, ranges: Sequence[tuple[int, int]], min_nr_regions: int,
                     nr_probes: int = 0, min_sz: int = PAGE) -> Regions:
        """DAMON's initial regions: every range split into pieces of about
        total/min_nr_regions bytes (damon_va_evenly_split_region)."""
        ranges = [(align_down(s, min_sz), align_up(e, min_sz)) for s, e in ranges]
        total = sum(e - s for s, e in ranges)
        piece = max(align_down(total // max(min_nr_regions, 1), min_sz), min_sz)
        starts: list[int] = []
        ends: list[int] = []
        for s, e in ranges:
            n = max((e - s) // piece, 1)
            sz = align_down((e - s) // n, min_sz) or min_sz
            cur = s
            for i in range(n):
                nxt = e if i == n - 1 else cur + sz
                starts.append(cur)
                ends.append(nxt)
                cur = nxt
        return cls(starts, ends, nr_probes)

    def _rebuild(self, idx: list[int], starts: list[int], ends: list[int]) -> None:
        """Replace the region list; counters are taken from the old regions ``idx``
        (-1 for a new region, which starts with zero counters)."""
        sel = np.asarray(idx, dtype=np.int64)
        new = sel < 0
        take = np.where(new, 0, sel)

        def pick(a: np.ndarray) -> np.ndarray:
            if a.shape[-1] == 0:
                return np.zeros(a.shape[:-1] + (sel.size,), dtype=a.dtype)
            out = a[..., take].copy()
            out[..., new] = 0
            return out

        self.nr_accesses = pick(self.nr_accesses)
        self.last_nr_accesses = pick(self.last_nr_accesses)
        self.age = pick(self.age)
        self.probe_hits = pick(self.probe_hits)
        self.written_pages = pick(self.written_pages)
        self.start = np.asarray(starts, dtype=np.uint64)
        self.end = np.asarray(ends, dtype=np.uint64)

    # -- lookup ------------------------------------------------------------

    def index_of(self, addrs: np.ndarray) -> np.ndarray:
        """Region index for each address, -1 where no region holds it."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        idx = np.searchsorted(self.start, addrs, side="right").astype(np.int64) - 1
        ok = idx >= 0
        ok[ok] = addrs[ok] < self.end[idx[ok]]
        idx[~ok] = -1
        return idx

    # -- DAMON adjustments ---------------------------------------------------

    def update_ages(self, thres: int) -> None:
        """kdamond_merge_regions' age rule, applied once per aggregation."""
        changed = (np.abs(self.nr_accesses - self.last_nr_accesses) > thres) | (
            (self.nr_accesses == 0) != (self.last_nr_accesses == 0)
        )
        self.age = np.where(changed, 0, self.age + 1)

    def merge(self, thres: int, sz_limit: int) -> None:
        """damon_merge_regions_of: merge adjacent regions whose nr_accesses differ
        by at most ``thres`` while the merged size stays within ``sz_limit``.
        Counters of a merged region are size-weighted averages, except written
        pages, which add up."""
        n = len(self)
        if n < 2:
            return
        start = self.start.tolist()
        end = self.end.tolist()
        acc = self.nr_accesses.tolist()
        age = self.age.tolist()
        last = self.last_nr_accesses.tolist()
        hits = [row.tolist() for row in self.probe_hits]
        wp = self.written_pages.tolist()
        o_wp = [wp[0]]
        o_start, o_end, o_acc, o_age, o_last = [start[0]], [end[0]], [acc[0]], [age[0]], [last[0]]
        o_hits = [[h[0]] for h in hits]
        for i in range(1, n):
            sz_prev = o_end[-1] - o_start[-1]
            sz = end[i] - start[i]
            if (o_end[-1] == start[i] and abs(o_acc[-1] - acc[i]) <= thres
                    and sz_prev + sz <= sz_limit):
                tot = sz_prev + sz
                o_acc[-1] = (o_acc[-1] * sz_prev + acc[i] * sz) // tot
                o_age[-1] = (o_age[-1] * sz_prev + age[i] * sz) // tot
                o_last[-1] = (o_last[-1] * sz_prev + last[i] * sz) // tot
                for p, h in enumerate(hits):
                    o_hits[p][-1] = (o_hits[p][-1] * sz_prev + h[i] * sz) // tot
                o_wp[-1] += wp[i]
                o_end[-1] = end[i]
            else:
                o_start.append(start[i])
                o_end.append(end[i])
                o_acc.append(acc[i])
                o_age.append(age[i])
                o_last.append(last[i])
                o_wp.append(wp[i])
                for p, h in enumerate(hits):
                    o_hits[p].append(h[i])
        self.start = np.asarray(o_start, dtype=np.uint64)
        self.end = np.asarray(o_end, dtype=np.uint64)
        self.nr_accesses = np.asarray(o_acc, dtype=np.int64)
        self.age = np.asarray(o_age, dtype=np.int64)
        self.last_nr_accesses = np.asarray(o_last, dtype=np.int64)
        self.probe_hits = np.asarray(o_hits, dtype=np.int64).reshape(len(hits), len(o_start))
        self.written_pages = np.asarray(o_wp, dtype=np.int64)

    def split(self, nr_subs: int, rng: np.random.Generator, min_sz: int = PAGE) -> None:
        """damon_split_regions_of: split each region into up to ``nr_subs`` pieces at
        random points (10%..90% of the remaining size); pieces keep the counters."""
        if nr_subs < 2:
            return
        idx: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        s_list = self.start.tolist()
        e_list = self.end.tolist()
        for i, (s, e) in enumerate(zip(s_list, e_list, strict=True)):
            pieces = [s]
            sz = e - s
            cur_start = s
            for _ in range(nr_subs - 1):
                if sz <= 2 * min_sz:
                    break
                sz_sub = align_down(int(rng.integers(1, 10)) * sz // 10, min_sz)
                if sz_sub == 0 or sz_sub >= sz:
                    continue
                # damon_split_region_at(r, sz_sub): r keeps the first sz_sub bytes and
                # the loop goes on splitting that first part.
                pieces.append(cur_start + sz_sub)
                sz = sz_sub
            bounds = sorted(set(pieces)) + [e]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                idx.append(i)
                starts.append(a)
                ends.append(b)
        self._rebuild(idx, starts, ends)

    def set_ranges(self, ranges: Sequence[tuple[int, int]], min_sz: int = PAGE) -> None:
        """damon_set_regions: make the regions cover exactly ``ranges`` (sorted,
        non-overlapping), keeping the counters of regions that stay."""
        ranges = sorted((align_down(s, min_sz), align_up(e, min_sz)) for s, e in ranges)
        s_list = self.start.tolist()
        e_list = self.end.tolist()
        idx: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        j = 0
        n = len(s_list)
        for rs, re_ in ranges:
            while j < n and e_list[j] <= rs:
                j += 1  # regions wholly before this range are dropped
            k = j
            first = len(idx)
            while k < n and s_list[k] < re_:
                a, b = max(s_list[k], rs), min(e_list[k], re_)
                if len(idx) > first and a > ends[-1]:  # a hole inside the range
                    idx.append(-1)
                    starts.append(ends[-1])
                    ends.append(a)
                idx.append(k)
                starts.append(a)
                ends.append(b)
                k += 1
            if len(idx) == first:  # nothing intersects: one new region
                idx.append(-1)
                starts.append(rs)
                ends.append(re_)
            else:  # the first and last intersecting regions stretch to the range's edges
                starts[first] = rs
                ends[-1] = re_
            # a region straddling two ranges serves the next one too (clipped)
            j = k - 1 if k > j and e_list[k - 1] > re_ else k
        self._rebuild(idx, starts, ends)

    def reset_aggregated(self) -> None:
        self.last_nr_accesses = self.nr_accesses
        self.nr_accesses = np.zeros_like(self.last_nr_accesses)
        self.probe_hits = np.zeros_like(self.probe_hits)
        self.written_pages = np.zeros_like(self.written_pages)

    def check_invariants(self) -> None:
        """Raise AssertionError if the list is not sorted and non-overlapping."""
        assert np.all(self.start < self.end), "empty or inverted region"
        assert np.all(self.end[:-1] <= self.start[1:]), "regions overlap or are unsorted"
