"""numpy helpers of the hot paths against numpy's own answers."""

import subprocess
import sys

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from udamon.arrays import sorted_unique


@given(arrays(np.uint64, st.integers(0, 200), elements=st.integers(0, 2**64 - 1))
       | arrays(np.int64, st.integers(0, 200), elements=st.integers(-5, 5)))
def test_sorted_unique_is_np_unique(a):
    got = sorted_unique(a)
    assert got.dtype == a.dtype
    assert np.array_equal(got, np.unique(a))


def test_sorted_unique_does_not_import_numpy_ma():
    """The reason it exists: the first plain np.unique imports numpy.ma mid-session."""
    code = ("import sys, numpy as np; from udamon.arrays import sorted_unique; "
            "sorted_unique(np.array([3, 1, 3])); print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_row_helpers_match_numpy_on_reports():
    """select_rows / copy_rows / concat_rows give numpy's results, as independent copies."""
    from udamon.arrays import concat_rows, copy_rows, select_rows
    from udamon.intake.reports import REPORT_DTYPE, empty

    rng = np.random.default_rng(3)
    a = empty(257)
    for name in REPORT_DTYPE.names:
        a[name] = rng.integers(0, 100, a.size).astype(REPORT_DTYPE[name])
    mask = rng.random(a.size) < 0.5
    idx = rng.integers(0, a.size, 40)
    for got, want in ((select_rows(a, mask), a[mask]), (select_rows(a, idx), a[idx]),
                      (select_rows(a, slice(3, 90, 2)), a[3:90:2]),
                      (copy_rows(a[::3]), a[::3].copy()),
                      (concat_rows([a, a[mask], a[:0]]), np.concatenate([a, a[mask], a[:0]])),
                      (concat_rows([a[5:9]]), a[5:9])):
        assert got.dtype == REPORT_DTYPE
        assert got.tobytes() == want.tobytes()
    c = copy_rows(a)
    c["addr"] = 0
    assert a["addr"].any()  # a copy, not a view
