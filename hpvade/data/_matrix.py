"""Read expression matrices in row chunks, in memory or backed, without densifying them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from hpvade._constants import CPM_SCALE

#: Rows per chunk when streaming a reference: bounds the extra memory of a linear-scale copy.
DEFAULT_CHUNK_SIZE = 50_000


def get_matrix(adata: AnnData, layer: str | None):
    """Return ``adata.X`` or ``adata.layers[layer]`` (backed datasets are returned as they are)."""
    if layer is None:
        if adata.X is None:
            raise ValueError(
                "`adata.X` is empty; pass `layer=` naming the layer that holds the data."
            )
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in `adata.layers` (available: {list(adata.layers)})."
        )
    return adata.layers[layer]


def iter_row_chunks(
    adata: AnnData, layer: str | None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, int, np.ndarray | sp.csr_matrix]]:
    """Yield ``(start, stop, block)`` over rows; blocks are CSR or dense, never a whole copy.

    Works for in-memory dense, CSR and CSC matrices and for ``backed="r"`` AnnData, whose
    sparse datasets are read one row slice at a time.
    """
    matrix = get_matrix(adata, layer)
    n = adata.n_obs
    if sp.issparse(matrix) and matrix.format == "csc":
        # Row slices of CSC are slow: convert the whole matrix to CSR once (a copy).
        matrix = matrix.tocsr()
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if isinstance(matrix, sp.csr_matrix | sp.csr_array):
            yield start, stop, csr_row_view(matrix, start, stop)
            continue
        block = matrix[start:stop]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
        elif not isinstance(block, np.ndarray):  # backed sparse datasets and array-likes
            block = block.to_memory() if hasattr(block, "to_memory") else np.asarray(block)
            block = sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        yield start, stop, block


def csr_row_view(matrix: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR matrix sharing its data and indices (scipy's slice copies)."""
    lo, hi = matrix.indptr[start], matrix.indptr[stop]
    return sp.csr_matrix(
        (matrix.data[lo:hi], matrix.indices[lo:hi], matrix.indptr[start : stop + 1] - lo),
        shape=(stop - start, matrix.shape[1]),
        copy=False,
    )


def _float_dtype(dtype) -> np.dtype:
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def to_linear(block, log1p: bool):
    """Undo ``log1p`` (sparse-preserving, since expm1(0) = 0) or return linear data as float.

    Sparse blocks get new values but share the input's index arrays; float32 stays float32
    (sums are accumulated in float64 by the callers).
    """
    if sp.issparse(block):
        dtype = _float_dtype(block.dtype)
        data = np.expm1(block.data, dtype=dtype) if log1p else block.data.astype(dtype, copy=False)
        return sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape, copy=False)
    block = np.asarray(block)
    block = block.astype(_float_dtype(block.dtype), copy=False)
    return np.expm1(block) if log1p else block


def check_finite_non_negative(values: np.ndarray, where: str, expected: str) -> None:
    """Raise a ``ValueError`` naming ``where`` if ``values`` hold NaN, infinite or negative
    entries; ``expected`` says what the data should be (ends the negative-values message)."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} contains NaN or infinite values; remove or impute them.")
    if values.size and values.min() < 0:
        raise ValueError(f"{where} contains negative values; {expected}")


def is_dask_array(matrix) -> bool:
    """Whether ``matrix`` is a Dask array (without importing Dask where it is not in use)."""
    return type(matrix).__module__.startswith("dask.")


def cpm_rows(matrix: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Scale each row to sum to 1e6 (in place when ``inplace``, saving a large copy)."""
    totals = matrix.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError(
            f"{int((totals <= 0).sum())} samples have zero total expression and cannot be "
            "CPM-normalised. Remove all-zero samples."
        )
    if inplace:
        matrix /= totals / CPM_SCALE
        return matrix
    return matrix / (totals / CPM_SCALE)
