"""Compiled kernel where scipy is slow: summing sampled sparse rows.

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
