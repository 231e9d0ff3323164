"""Read expression matrices in row chunks, in memory or backed, without densifying them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

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
        # Row slices of CSC are slow: convert chunk-wise through a column-major gather.
        matrix = matrix.tocsr()
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = matrix[start:stop]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
        elif not isinstance(block, np.ndarray):  # backed sparse datasets and array-likes
            block = block.to_memory() if hasattr(block, "to_memory") else np.asarray(block)
            block = sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        yield start, stop, block


def to_linear(block, log1p: bool):
    """Undo ``log1p`` (sparse-preserving, since expm1(0) = 0) or return linear data as float."""
    if sp.issparse(block):
        block = block.astype(np.float64) if block.dtype != np.float64 else block.copy()
        if log1p:
            np.expm1(block.data, out=block.data)
        return block
    block = np.asarray(block, dtype=np.float64)
    return np.expm1(block) if log1p else block
