"""Reference deconvolution methods to compare hpvade against."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.optimize import nnls

from hpvade.core import rna_to_cell_fractions, rows_sum_to_one
from hpvade.data._labels import get_label_codes
from hpvade.data._matrix import cpm_rows
from hpvade.data._pseudobulk import cell_totals, mean_per_type
from hpvade.data._signature import build_signature, scale_columns_to_cpm
from hpvade.tl import markers

__all__ = [
    "adaptive_nnls_proportions",
    "dampened_nnls_proportions",
    "marker_genes_wilcoxon",
    "marker_recipe_proportions",
    "nnls_proportions",
    "type_rna_content",
]


def nnls_proportions(bulk_cpm: np.ndarray, signature: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Non-negative least squares of each bulk sample on the signature, rescaled to sum to 1.

    Parameters
    ----------
    bulk_cpm
        Samples × genes, linear scale (CPM), genes in the signature's row order.
    signature
        Genes × types (CPM).

    Returns
    -------
    Samples × types proportions.
    """
    signature = np.asarray(signature, dtype=float)
    bulk_cpm = np.asarray(bulk_cpm, dtype=float)
    coef = np.stack([nnls(signature, sample)[0] for sample in bulk_cpm])
    return rows_sum_to_one(coef)


def adaptive_nnls_proportions(
    bulk_cpm: np.ndarray,
    signature: np.ndarray | pd.DataFrame,
    n_rounds: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Alternating NNLS that learns the signature from the bulks themselves.

    Each round solves P given S (one NNLS per sample) and then S given P (one NNLS per gene),
    with S initialised from the reference signature and gene rows weighted by
    ``1 / sqrt(mean bulk expression)``.

    Parameters
    ----------
    bulk_cpm
        Samples × genes (CPM), genes in the signature's row order.
    signature
        Genes × types reference signature (CPM), the starting point.
    n_rounds
        Alternating rounds.

    Returns
    -------
    ``(proportions, signature)``: samples × types proportions (rows sum to 1) and the learned
    genes × types signature.
    """
    bulk = np.asarray(bulk_cpm, dtype=float)
    S = np.asarray(signature, dtype=float).copy()
    weights = 1.0 / np.sqrt(bulk.mean(axis=0) + 1.0)
    weighted_bulk = bulk * weights

    def proportions_given(S: np.ndarray) -> np.ndarray:
        return np.stack([nnls(S * weights[:, None], sample)[0] for sample in weighted_bulk])

    for _ in range(n_rounds):
        P = proportions_given(S)
        S = np.stack([nnls(P, bulk[:, g])[0] for g in range(bulk.shape[1])])
    return rows_sum_to_one(proportions_given(S)), S


def marker_genes_wilcoxon(
    reference: AnnData, labels_key: str, n_genes: int = 50, min_log_fold_change: float = 1.0
) -> pd.Index:
    """Deprecated: :func:`hpvade.tl.markers` with ``max_cells_per_type=None``; removed in 0.4.

    Parameters
    ----------
    reference, labels_key, n_genes, min_log_fold_change
        As for :func:`hpvade.tl.markers`.

    Returns
    -------
    Index of the marker genes, type by type.
    """
    warnings.warn(
        "`hpvade.baselines.marker_genes_wilcoxon` is `hpvade.tl.markers(reference, labels_key, "
        "max_cells_per_type=None).index`; the old name stops working in 0.4.",
        FutureWarning,
        stacklevel=2,
    )
    return _all_cell_markers(reference, labels_key, n_genes, min_log_fold_change)


def _all_cell_markers(reference, labels_key, n_genes, min_log_fold_change) -> pd.Index:
    """The Wilcoxon markers of every cell (the baselines rank them all)."""
    found = markers(reference, labels_key, n_genes, min_log_fold_change, max_cells_per_type=None)
    return pd.Index(found.index)


def dampened_nnls_proportions(
    bulk_cpm: np.ndarray, signature: np.ndarray | pd.DataFrame, n_rounds: int = 20
) -> np.ndarray:
    """NNLS re-weighted by ``1 / sqrt(fitted value)`` for ``n_rounds`` (a dampened weighted
    least squares in the spirit of DWLS), rescaled to sum to 1.

    Parameters
    ----------
    bulk_cpm
        Samples × genes, linear scale, genes in the signature's row order.
    signature
        Genes × types (CPM).
    n_rounds
        Re-weighting rounds after the plain NNLS start.

    Returns
    -------
    Array (samples × types) of proportions; rows sum to 1.
    """
    signature = np.asarray(signature, dtype=float)
    bulk = np.asarray(bulk_cpm, dtype=float)
    coef = np.stack([nnls(signature, sample)[0] for sample in bulk])
    for _ in range(n_rounds):
        fitted = np.maximum(coef @ signature.T, 1e-3 * bulk.mean(axis=1, keepdims=True))
        weights = 1.0 / np.sqrt(fitted)
        coef = np.stack(
            [nnls(signature * w[:, None], b * w)[0] for b, w in zip(bulk, weights, strict=True)]
        )
    return rows_sum_to_one(coef)


def marker_recipe_proportions(
    reference: AnnData,
    labels_key: str,
    bulk: pd.DataFrame,
    counts_layer: str | None = None,
    n_genes: int = 50,
) -> pd.DataFrame:
    """A plain marker recipe: Wilcoxon markers, dampened NNLS on their
    CPM signature, then RNA fractions divided by each type's mean counts per cell.

    Parameters
    ----------
    reference
        Log1p-normalised reference (``X``), raw counts in ``counts_layer`` if given.
    labels_key
        Column of ``reference.obs`` with cell-type labels.
    bulk
        Samples × genes, linear scale (counts, CPM or TPM).
    counts_layer
        Layer with raw counts: S is built from counts and the RNA fractions are converted to
        cell fractions by each type's mean counts per cell. ``None``: RNA fractions.
    n_genes
        Markers per type.

    Returns
    -------
    Samples × types proportions (rows sum to 1).
    """
    markers = _all_cell_markers(reference, labels_key, n_genes, 1.0)
    markers = markers[markers.isin(bulk.columns)]
    signature = build_signature(reference, labels_key, counts_layer=counts_layer).loc[markers]
    signature = scale_columns_to_cpm(signature)
    values = cpm_rows(bulk[markers].to_numpy(dtype=float), inplace=True)
    proportions = dampened_nnls_proportions(values, signature.to_numpy())
    if counts_layer is not None:
        content = type_rna_content(reference, labels_key, counts_layer)
        proportions = rna_to_cell_fractions(proportions, content)
    return pd.DataFrame(proportions, index=bulk.index, columns=signature.columns)


def type_rna_content(reference: AnnData, labels_key: str, counts_layer: str) -> np.ndarray:
    """Each type's RNA content: mean raw counts per cell, in the label categories' order.

    Parameters
    ----------
    reference
        Reference with raw counts in ``counts_layer``.
    labels_key
        Column of ``reference.obs`` with cell-type labels.
    counts_layer
        Layer with raw counts.

    Returns
    -------
    Array (types, in the order of the labels' categories): mean raw counts per cell.
    """
    codes, categories = get_label_codes(reference, labels_key)
    totals = cell_totals(reference, counts_layer, log1p=False)
    return mean_per_type(totals, codes, len(categories))
