"""Compiled kernels where numpy and scipy are slow: summing sampled sparse rows, and the
median of a vector (numba's ``np.median`` mispredicts its branches on random data).

``counts @ X`` with a sparse (samples × cells) ``counts`` and a sparse (cells × genes) ``X`` is a
sparse × sparse product whose result is nearly dense. scipy builds that result as a sparse
matrix in two passes; accumulating straight into a dense output, one sample per thread, does
one pass (``benchmarks/scale.py`` times both).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _add_sampled_rows(out, c_indptr, c_indices, c_data, x_indptr, x_indices, x_data):
    for sample in prange(out.shape[0]):
        for j in range(c_indptr[sample], c_indptr[sample + 1]):
            row, weight = c_indices[j], c_data[j]
            for k in range(x_indptr[row], x_indptr[row + 1]):
                out[sample, x_indices[k]] += weight * x_data[k]


def add_sampled_rows(out: np.ndarray, counts, block) -> None:
    """``out += counts @ block`` for CSR ``counts`` (samples × rows) and CSR ``block``, in place.

    ``out`` is a dense float64 (samples × genes) array; each thread owns whole output rows, so
    no two threads write to the same place.
    """
    _add_sampled_rows(
        out,
        counts.indptr,
        counts.indices,
        counts.data.astype(np.float64, copy=False),
        block.indptr,
        block.indices,
        block.data,
    )


@njit(cache=True)
def _kth_smallest(a, k):
    """The k-th smallest value of ``a`` (reordered in place): quickselect with a median-of-three
    pivot and branch-free partitions. numba's ``np.median`` partitions with branches that
    random data mispredicts."""
    lo, hi = 0, a.size
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi - 1]
        pivot = max(min(x, y), min(max(x, y), z))
        if pivot != pivot:  # NaN: no order to select in
            return pivot
        below = lo  # a[lo:below] < pivot
        for i in range(lo, hi):
            v = a[i]
            a[i] = a[below]
            a[below] = v
            below += v < pivot
        equal = below  # a[below:equal] == pivot
        for i in range(below, hi):
            v = a[i]
            a[i] = a[equal]
            a[equal] = v
            equal += v == pivot
        if k < below:
            hi = below
        elif k < equal:
            return pivot
        else:
            lo = equal
    return a[lo]


@njit(cache=True)
def median_in_place(a):
    """``np.median(a)`` (the mean of the two middle values of an even count), reordering ``a``."""
    half = a.size // 2
    upper = _kth_smallest(a, half)
    if a.size % 2:
        return upper
    lower = a[0]
    for t in range(1, half):  # after the selection a[:half] holds the smaller values
        lower = max(lower, a[t])
    return (lower + upper) / 2.0
