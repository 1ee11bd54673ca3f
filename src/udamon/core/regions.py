"""Per-target region list and DAMON's region adjustment (mm/damon/core.c).

Regions are kept in parallel numpy arrays sorted by address, non-overlapping.
Merging and splitting walk the list once per aggregation: in C
(``udamon.core._regions``) when it is built, else in numpy here, with the same
results (tests/test_regions_native.py).  The list is bounded by max_nr_regions,
which is what keeps DAMON's overhead bounded; the C walk exists because an idle
session spent most of its CPU in the numpy version's small array calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from udamon.arrays import sorted_unique
from udamon.native import load as load_native

PAGE = 4096


_native = load_native("udamon.core._regions")


def native() -> bool:
    """Whether merge, split and the age rule run in C."""
    return _native is not None


def align_down(x: int, a: int) -> int:
    return x - x % a


def align_up(x: int, a: int) -> int:
    return -(-x // a) * a


class SplitDraws:
    """The random cut points of region splits (integers 1..9), drawn from a generator in
    blocks: a split then slices the block instead of calling the generator, whose first
    call after a sleep cost ~50 us of an idle session's aggregation.  Seeded, it draws
    the same sequence every run, as the generator would (not the same values)."""

    def __init__(self, rng: np.random.Generator, block: int = 4096):
        self.rng = rng
        self.block = block
        self._pool = np.zeros(0, dtype=np.int64)
        self._pos = 0

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        if (low, high) != (1, 10):
            return self.rng.integers(low, high, size=size)
        if self._pos + size > self._pool.size:
            self._pool = self.rng.integers(1, 10, size=max(self.block, size))
            self._pos = 0
        out = self._pool[self._pos:self._pos + size]
        self._pos += size
        return out


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

    def summary(self) -> tuple[int, int]:
        """(total bytes, highest nr_accesses or 0): what a merge needs first."""
        if _native is not None:
            try:
                return _native.summary(self.start, self.end, self.nr_accesses)
            except (ValueError, BufferError):
                pass
        return self.total_size(), int(self.nr_accesses.max(initial=0))

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

    def count_distinct(self, keys: np.ndarray, shift: int, width: int) -> np.ndarray:
        """Regions x ``width`` columns: the distinct ``keys`` (uint64, page number <<
        ``shift`` | column) whose page a region holds, counted in their column (columns
        past ``width`` are left out).  A hash set in C; numpy's sort otherwise."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        n = len(self)
        out = np.zeros(n * width, dtype=np.int64)
        if n and width and keys.size:
            if _native is not None:
                _native.distinct(self.start, self.end, keys, shift, out)
            else:
                key = sorted_unique(keys)
                col = (key & np.uint64((1 << shift) - 1)).astype(np.int64)
                ridx = self.index_of((key >> np.uint64(shift)) * np.uint64(PAGE))
                ok = (ridx >= 0) & (col < width)
                out = np.bincount(ridx[ok] * width + col[ok], minlength=n * width)
        return out.reshape(n, width).astype(np.int64, copy=False)

    # -- DAMON adjustments ---------------------------------------------------

    def update_ages(self, thres: int) -> None:
        """kdamond_merge_regions' age rule, applied once per aggregation."""
        if _native is not None:
            out = np.empty(len(self), dtype=np.int64)
            try:
                _native.ages(self.nr_accesses, self.last_nr_accesses, self.age, thres, out)
            except (ValueError, BufferError, OverflowError):
                pass  # not int64 arrays: the numpy rule below
            else:
                self.age = out
                return
        changed = (np.abs(self.nr_accesses - self.last_nr_accesses) > thres) | (
            (self.nr_accesses == 0) != (self.last_nr_accesses == 0)
        )
        self.age = np.where(changed, 0, self.age + 1)

    def merge(self, thres: int, sz_limit: int,
              weighted: list[tuple[int, int, int]] | None = None) -> None:
        """damon_merge_regions_of: merge adjacent regions whose nr_accesses differ
        by at most ``thres`` while the merged size stays within ``sz_limit``.
        Counters of a merged region are size-weighted averages, except written
        pages, which add up.  As in the kernel, regions are merged left to right,
        each into the merged region before it, with integer division at every step;
        only the regions that do merge are combined one by one.

        ``weighted``: (probe index, weight, threshold) of the probes that steer region
        adjustment (DAMON's probe ``weight``): two regions then also need every such
        probe's weighted hits within its threshold of each other."""
        n = len(self)
        if n < 2:
            return
        if _native is not None and self._merge_c(thres, sz_limit, weighted):
            return
        self._merge_numpy(thres, sz_limit, weighted)

    def _merge_c(self, thres: int, sz_limit: int,
                 weighted: list[tuple[int, int, int]] | None) -> bool:
        """merge() in C: one output table, the region arrays become views of its rows.
        False (nothing changed) when an array is not the 8-byte integers C expects."""
        n, nprobes = len(self), self.nr_probes
        tab = np.empty((6 + nprobes, n), dtype=np.int64)
        rows = list(tab)
        probes = list(self.probe_hits)
        try:
            m = _native.merge(self.start, self.end,
                              [self.nr_accesses, self.age, self.last_nr_accesses, *probes],
                              [self.written_pages],
                              [(3 + p, w, th) for p, w, th in (weighted or ())],
                              thres, sz_limit, rows[0].view(np.uint64), rows[1].view(np.uint64),
                              rows[3:], rows[2:3])
        except (ValueError, BufferError, OverflowError):
            return False
        if m != n:  # else nothing merged: keep the arrays
            self._take_table(tab, m)
        return True

    def _take_table(self, tab: np.ndarray, m: int) -> None:
        """The region arrays become views of the first ``m`` columns of a C walk's
        output table (rows: start, end, written pages, nr_accesses, age, last
        nr_accesses, probe hits)."""
        tab = tab[:, :m]
        self.start = tab[0].view(np.uint64)
        self.end = tab[1].view(np.uint64)
        self.written_pages = tab[2]
        self.nr_accesses, self.age, self.last_nr_accesses = tab[3], tab[4], tab[5]
        self.probe_hits = tab[6:]

    def _merge_numpy(self, thres: int, sz_limit: int,
                     weighted: list[tuple[int, int, int]] | None) -> None:
        n = len(self)
        start = self.start.tolist()
        end = self.end.tolist()
        acc = self.nr_accesses.tolist()
        wrows = [(w, th, (self.probe_hits[p] * w).tolist()) for p, w, th in (weighted or ())]
        firsts = [0]  # index of the first region of each merged region
        cur_acc, cur_sz, cur_end = acc[0], end[0] - start[0], end[0]
        cur_w = [row[0] for _, _, row in wrows]
        for i in range(1, n):
            sz = end[i] - start[i]
            if (cur_end == start[i] and abs(cur_acc - acc[i]) <= thres
                    and cur_sz + sz <= sz_limit
                    and all(abs(c - row[i]) <= th
                            for c, (_, th, row) in zip(cur_w, wrows, strict=True))):
                tot = cur_sz + sz
                cur_acc = (cur_acc * cur_sz + acc[i] * sz) // tot
                cur_w = [(c * cur_sz + row[i] * sz) // tot
                         for c, (_, _, row) in zip(cur_w, wrows, strict=True)]
                cur_sz = tot
                cur_end = end[i]
            else:
                firsts.append(i)
                cur_acc, cur_sz, cur_end = acc[i], sz, end[i]
                cur_w = [row[i] for _, _, row in wrows]
        if len(firsts) == n:
            return  # nothing merged
        f = np.asarray(firsts, dtype=np.int64)
        last = np.append(f[1:], n) - 1  # last region of each merged region
        # counters averaged by size, one column each: nr_accesses, age, last, probe hits.
        # A merged region whose parts all have the same counters keeps them (the size-
        # weighted average of equal values); the others are combined step by step in
        # Python integers (exact, and cheaper than numpy for a few rows)
        avg = np.vstack((self.nr_accesses, self.age, self.last_nr_accesses,
                         self.probe_hits)).T
        lo = np.minimum.reduceat(avg, f, axis=0)
        hi = np.maximum.reduceat(avg, f, axis=0)
        rows = lo.tolist()
        mixed = np.flatnonzero((lo != hi).any(axis=1)).tolist()
        if mixed:
            cols = avg.tolist()
            sizes = [b - a for a, b in zip(start, end, strict=True)]
            lasts = last.tolist()
            for g in mixed:
                a, b = firsts[g], lasts[g]
                x = cols[a]
                tot = sizes[a]
                for j in range(a + 1, b + 1):
                    sz = sizes[j]
                    x = [(u * tot + v * sz) // (tot + sz)
                         for u, v in zip(x, cols[j], strict=True)]
                    tot += sz
                rows[g] = x
        out = np.asarray(rows, dtype=np.int64).reshape(f.size, avg.shape[1]).T
        self.written_pages = np.add.reduceat(self.written_pages, f)
        self.start = self.start[f]
        self.end = self.end[last]
        self.nr_accesses, self.age, self.last_nr_accesses = (out[0].copy(), out[1].copy(),
                                                             out[2].copy())
        self.probe_hits = np.ascontiguousarray(out[3:]).reshape(self.nr_probes, f.size)

    def split(self, nr_subs: int, rng: np.random.Generator | SplitDraws,
              min_sz: int = PAGE) -> None:
        """damon_split_regions_of: split each region into up to ``nr_subs`` (2 or 3)
        pieces at random points (10%..90% of the remaining size); pieces keep the
        counters.  As in the kernel, the second cut goes into the first piece, and a
        draw that would leave nothing (0 or the whole size) is skipped.  Vectorised:
        one draw per region per cut."""
        if nr_subs < 2 or len(self) == 0:
            return
        # one draw per region per cut, made here so that both versions cut alike
        draws = [rng.integers(1, 10, size=len(self)) for _ in range(min(nr_subs, 3) - 1)]
        if _native is not None and self._split_c(draws, min_sz):
            return
        self._split_numpy(draws, min_sz)

    def _split_c(self, draws: list[np.ndarray], min_sz: int) -> bool:
        """split() in C (see _merge_c)."""
        n, nprobes = len(self), self.nr_probes
        tab = np.empty((6 + nprobes, (len(draws) + 1) * n), dtype=np.int64)
        rows = list(tab)
        try:
            m = _native.split(self.start, self.end,
                              [self.written_pages, self.nr_accesses, self.age,
                               self.last_nr_accesses, *self.probe_hits],
                              draws, min_sz, rows[0].view(np.uint64), rows[1].view(np.uint64),
                              rows[2:])
        except (ValueError, BufferError, OverflowError):
            return False
        if m != n:  # else no cut
            self._take_table(tab, m)
        return True

    def _split_numpy(self, draws: list[np.ndarray], min_sz: int) -> None:
        start = self.start.astype(np.int64)
        end = self.end.astype(np.int64)
        sz = end - start
        cuts_s: list[np.ndarray] = []
        for r in draws:
            sub = (r * sz // 10) // min_sz * min_sz  # damon_split_region_at(r, sz_sub)
            ok = (sz > 2 * min_sz) & (sub > 0) & (sub < sz)
            cuts_s.append(start[ok] + sub[ok])
            sz = np.where(ok, sub, sz)  # the next cut goes into the first piece
        cuts = np.concatenate(cuts_s)
        if cuts.size == 0:
            return
        new_start = np.sort(np.concatenate((start, cuts)))
        new_end = np.sort(np.concatenate((end, cuts)))  # pieces do not overlap: pairs match
        idx = np.searchsorted(start, new_start, side="right") - 1
        self._rebuild(idx.tolist(), new_start.tolist(), new_end.tolist())

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
        # one zeroed table for the counters that restart (fewer array calls per
        # aggregation; the rows are independent arrays to their users)
        n = len(self)
        z = np.zeros((2 + self.nr_probes, n), dtype=np.int64)
        self.nr_accesses, self.written_pages = z[0], z[1]
        self.probe_hits = z[2:]

    def check_invariants(self) -> None:
        """Raise AssertionError if the list is not sorted and non-overlapping."""
        assert np.all(self.start < self.end), "empty or inverted region"
        assert np.all(self.end[:-1] <= self.start[1:]), "regions overlap or are unsorted"
