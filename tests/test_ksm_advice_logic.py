"""The KSM advisor's decisions on constructed pages: what is cold, what is a
duplicate, how ranges are joined, what KSM's account would show.  (Live, against
the real KSM: tests/test_ksm_advise.py.)"""

from __future__ import annotations

import numpy as np

from udamon.report.ksm_advice import PAGE, TargetPages, advise
from udamon.targets.content import hash_words

S = 1_000_000_000
BASE = 0x7F0000000000


def pages(n: int, *, hashes, zero=None, last=None, since=0, writes=None, pid=1,
          mergeable=False) -> TargetPages:
    addr = BASE + np.arange(n, dtype=np.uint64) * np.uint64(PAGE)
    return TargetPages(pid, f"p{pid}", addr, np.asarray(hashes, np.uint64),
                       np.zeros(n, bool) if zero is None else np.asarray(zero, bool),
                       np.full(n, -1, np.int64) if last is None else np.asarray(last, np.int64),
                       np.full(n, since, np.int64),
                       np.zeros(n, np.int64) if writes is None else np.asarray(writes),
                       [(BASE, BASE + n * PAGE, mergeable)])


def run(ts, **kw):
    return advise(ts, start_ns=0, end_ns=10 * S, intervals=10,
                  settings=kw.pop("settings", {"use_zero_pages": 0, "max_page_sharing": 256}),
                  **kw)


def test_four_way_duplicates_cold_and_hot():
    n = 256
    h = np.arange(n) % 64  # every content 4 times
    last = np.full(n, -1)
    last[128:] = 9 * S  # the upper half written a second ago: not cold
    adv = run([pages(n, hashes=h, last=last)])
    (t,) = adv.targets
    assert t.cold_pages == 128
    # the cold half's contents: 0..63 twice each -> all duplicates
    assert t.duplicate_pages == 128 and t.merging_pages == 128
    (c,) = t.candidates
    assert (c.start, c.end) == (BASE, BASE + 128 * PAGE) and c.never_written
    assert c.predicted_saving == 128 * PAGE
    assert adv.freed_bytes == 64 * PAGE  # 64 contents, 2 cold copies each: 1 freed each


def test_scattered_cold_duplicates_are_not_joined_into_a_range():
    n = 400
    h = np.arange(n) % 100
    last = np.full(n, 9 * S)
    last[::10] = -1  # one cold page in ten, as in a write-hot region
    adv = run([pages(n, hashes=h, last=last)])
    (t,) = adv.targets
    assert t.candidates == []


def test_gaps_are_joined_while_dense():
    n = 200
    h = np.arange(n) % 50
    last = np.full(n, -1)
    last[[20, 60, 61, 150]] = 9 * S  # a few written pages inside a cold region
    adv = run([pages(n, hashes=h, last=last)])
    (t,) = adv.targets
    (c,) = t.candidates
    assert (c.start, c.end) == (BASE, BASE + n * PAGE)
    assert c.pages == n - 4 and c.merging_pages == n - 4


def test_zero_pages_with_and_without_use_zero_pages():
    n = 64
    z = np.ones(n, bool)
    h = np.zeros(n, np.uint64)
    a = run([pages(n, hashes=h, zero=z)])
    (t,) = a.targets
    assert (t.merging_pages, t.zero_merged) == (n, 0)  # merge with each other
    assert a.freed_bytes == (n - 1) * PAGE
    b = run([pages(n, hashes=h, zero=z)], settings={"use_zero_pages": 1})
    (t,) = b.targets
    assert (t.merging_pages, t.zero_merged) == (0, n)  # to the zero page: ksm_zero_pages
    assert b.freed_bytes == n * PAGE and t.predicted_saving == n * PAGE


def test_duplicates_across_targets_only():
    n = 64
    h = np.arange(n) + 1000
    alone = run([pages(n, hashes=h)])
    assert alone.targets[0].candidates == []
    both = run([pages(n, hashes=h, pid=1), pages(n, hashes=h, pid=2)])
    assert [t.merging_pages for t in both.targets] == [n, n]
    assert both.freed_bytes == n * PAGE


def test_write_hot_mergeable_ranges_are_listed_for_unmerging():
    n = 128
    last = np.full(n, 9 * S)  # everything written a second ago
    adv = run([pages(n, hashes=np.arange(n), last=last, writes=np.full(n, 5),
                     mergeable=True)])
    (t,) = adv.targets
    assert t.candidates == [] and len(t.unmerge) == 1
    assert t.unmerge[0].written_pages == n
    # not offered to KSM: nothing to take back
    adv = run([pages(n, hashes=np.arange(n), last=last, mergeable=False)])
    assert adv.targets[0].unmerge == []


def test_max_page_sharing_keeps_a_copy_per_256_sharers():
    n = 600
    adv = run([pages(n, hashes=np.zeros(n) + 7)])
    assert adv.freed_bytes == (n - 3) * PAGE  # ceil(600 / 256) = 3 KSM pages


def test_hash_tells_pages_apart_and_equal_pages_together():
    rng = np.random.default_rng(3)
    w = rng.integers(0, 1 << 63, (64, 512), dtype=np.uint64)
    w[10] = w[3]
    w[20, 511] ^= np.uint64(1 << 63)  # one bit at the top of the last word
    h = hash_words(w)
    assert h[10] == h[3]
    assert len(set(h.tolist())) == 63
    z = np.zeros((2, 512), np.uint64)
    z[1, 0] = 1
    assert hash_words(z)[0] != hash_words(z)[1]


def test_a_twin_that_will_not_be_offered_does_not_count():
    """A cold run whose only twins are scattered cold pages of a write-hot area
    (too sparse to offer): nothing would merge, so nothing is predicted."""
    n = 264
    h = np.arange(n) + 5000
    last = np.full(n, -1)
    last[64:] = 9 * S  # pages 64.. are write-hot ...
    cold_twins = np.arange(64, 264, 10)  # ... but for one in ten, cold
    last[cold_twins] = -1
    h[cold_twins] = np.arange(20) + 5000  # twins of pages 0..19
    adv = run([pages(n, hashes=h, last=last)])
    (t,) = adv.targets
    assert t.duplicate_pages == 40  # they are duplicates ...
    assert t.candidates == [] and t.merging_pages == 0 and adv.freed_bytes == 0  # ... unoffered
