"""The reference signature S: per-type aggregate of linear expression, scaled to CPM."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from hpvade._constants import CPM_SCALE
from hpvade.data._labels import get_label_codes, indicator_matrix
from hpvade.data._matrix import DEFAULT_CHUNK_SIZE, iter_row_chunks, to_linear
from hpvade.data._validation import resolve_counts_layer, validate_input

logger = logging.getLogger(__name__)

#: Below this relative spread across types (see ``signature_spread``), all types look alike.
MIN_SIGNATURE_CV = 0.05


def aggregate_by_type(
    adata: AnnData,
    codes: np.ndarray,
    n_types: int,
    layer: str | None,
    log1p: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Sum linear expression per type: ``indicator @ expm1(X)``, chunked over cells.

    Returns a dense (types × genes) array; the reference is read in row chunks and only
    each chunk's linear-scale copy is ever held.
    """
    return type_sums_and_cell_totals(adata, codes, n_types, layer, log1p, chunk_size)[0]


def type_sums_and_cell_totals(
    adata: AnnData,
    codes: np.ndarray,
    n_types: int,
    layer: str | None,
    log1p: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Each type's summed linear expression (types × genes) and each cell's total (as
    :func:`~hpvade.data._pseudobulk.cell_totals`), in one pass over the cells: a model reads
    its reference once for both."""
    sums, totals = np.zeros((n_types, adata.n_vars)), np.zeros(adata.n_obs)
    for start, stop, block in iter_row_chunks(adata, layer, chunk_size):
        linear = to_linear(block, log1p)
        part = indicator_matrix(codes[start:stop], n_types) @ linear
        sums += part.toarray() if hasattr(part, "toarray") else part
        totals[start:stop] = np.asarray(linear.sum(axis=1)).ravel()
    return sums, totals


def cpm_columns(aggregate: np.ndarray) -> np.ndarray:
    """Scale each row of a (types × genes) aggregate to sum to 1e6; return genes × types."""
    totals = aggregate.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("A cell type has zero total expression: its cells carry no counts.")
    return (aggregate / totals * CPM_SCALE).T


def scale_columns_to_cpm(matrix):
    """A copy of ``matrix`` (genes × types, array or DataFrame) with every column scaled to
    sum to 1e6."""
    totals = np.asarray(matrix.sum(axis=0), dtype=float)
    return matrix * (CPM_SCALE / np.maximum(totals, 1e-300))


def signature_spread(signature: np.ndarray) -> float:
    """Mean per-gene standard deviation across cell types, relative to the mean of S.

    About 0.7 for real PBMC types; 0 when all types share one profile.
    """
    return float(signature.std(axis=1).mean() / signature.mean())


def warn_if_flat(signature: np.ndarray, stacklevel: int = 2) -> None:
    """Warn when cell types have (almost) the same profile: deconvolution has nothing to use."""
    spread = signature_spread(signature)
    if spread < MIN_SIGNATURE_CV:
        warnings.warn(
            f"The signature barely varies across cell types (relative spread {spread:.3g} < "
            f"{MIN_SIGNATURE_CV}). All types look alike, so proportions cannot be "
            "resolved. Check that X holds log1p-normalised expression (not log of already "
            "averaged or per-cell re-normalised data) and that labels mark distinct types.",
            UserWarning,
            stacklevel=stacklevel,
        )


def build_signature(
    adata: AnnData,
    labels_key: str,
    layer: str | None = None,
    *,
    counts_layer: str | None = None,
    counts: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> pd.DataFrame:
    """Build the reference signature S (genes × cell types, CPM).

    For each type, ``expm1`` of the log1p-normalised values is summed over its cells and the
    summed profile is scaled to 1e6. Aggregating before normalising keeps the differences
    between types; normalising each cell and averaging erases them.

    Parameters
    ----------
    adata
        Reference (cells × genes). Dense, CSR, CSC or opened with ``backed="r"``.
    labels_key
        Column of ``adata.obs`` with cell-type labels.
    layer
        Layer with log1p-normalised values; ``None`` uses ``adata.X``.
    counts_layer
        Layer with raw counts, as in :meth:`hpvade.HPVADE.setup_anndata`: when given, counts
        are summed as they are instead of ``expm1`` of ``layer``.
    counts
        Deprecated (use ``counts_layer``): ``True`` means ``layer`` holds raw counts.
    chunk_size
        Cells read at a time; bounds the extra memory.

    Returns
    -------
    DataFrame indexed by ``adata.var_names`` with one column per cell type; columns sum to 1e6.

    Examples
    --------
    >>> S = hpvade.pp.build_signature(ref, labels_key="cell_type")
    >>> S.sum(axis=0)  # 1e6 for every type
    """
    layer, counts = resolve_counts_layer(layer, counts_layer, counts)
    codes, categories = get_label_codes(adata, labels_key)
    validate_input(adata, layer, counts)
    aggregate = aggregate_by_type(
        adata, codes, len(categories), layer, log1p=not counts, chunk_size=chunk_size
    )
    signature = cpm_columns(aggregate)
    warn_if_flat(signature, stacklevel=3)
    logger.info("Built a %d genes x %d types signature.", *signature.shape)
    return pd.DataFrame(signature, index=adata.var_names.copy(), columns=categories)
