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
