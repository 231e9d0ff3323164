"""Tools that compute on model outputs (scanpy style); plots are in :mod:`hpvade.pl`."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from hpvade.core import DEFAULT_ROUNDS, ProportionEstimator
from hpvade.data._bulk import as_bulk_anndata, prepare_bulk
from hpvade.data._genes import (
    DEFAULT_MARKERS_PER_TYPE,
    MAX_CELLS_PER_TYPE,
    MIN_LOG_FOLD_CHANGE,
    wilcoxon_markers,
)
from hpvade.data._labels import get_label_codes
from hpvade.data._matrix import get_matrix
from hpvade.data._signature import scale_columns_to_cpm

__all__ = ["fit_proportions", "markers", "signature_markers"]


def fit_proportions(
    bulk: AnnData | pd.DataFrame,
    signature: pd.DataFrame,
    genes: list[str] | None = None,
    n_rounds: int = DEFAULT_ROUNDS,
    layer: str | None = None,
) -> pd.DataFrame:
    """Proportions of bulk samples by the robust fit :class:`~hpvade.HPVADE` serves, without
    a model.

    Each sample is fitted by dampened weighted least squares whose gene weights follow the
    sample's own mean-variance trend and set aside genes far off the fit (a protocol's
    distortion, cells the signature lacks), re-weighted for ``n_rounds`` rounds, started from
    equal proportions (a model starts from its network's output: the results agree closely).

    Parameters
    ----------
    bulk
        Samples × genes on a linear scale (counts, CPM or TPM), AnnData or DataFrame.
    signature
        Genes × types, e.g. :func:`hpvade.pp.build_signature` or
        :meth:`hpvade.HPVADE.get_signature`.
    genes
        Genes the fit uses (e.g. a model's ``selected_genes_``); ``None``: every signature
        gene. Genes the bulk lacks are left out.
    n_rounds
        Re-weighting rounds.
    layer
        Layer of an AnnData ``bulk`` with the values; ``None`` uses ``X``.

    Returns
    -------
    DataFrame (samples × types), rows sum to 1: fractions of the sample's RNA that each type
    contributes.
    """
    bulk = as_bulk_anndata(bulk)
    values = scale_columns_to_cpm(signature.to_numpy(dtype=float))
    used = np.ones(len(signature), dtype=bool) if genes is None else signature.index.isin(genes)
    prepared = prepare_bulk(
        bulk, layer, signature.index, values, used, None, stacklevel=3, written=False
    )
    cpm, found = prepared.cpm, prepared.found
    initial = np.full((cpm.shape[0], values.shape[1]), 1.0 / values.shape[1])
    fit = ProportionEstimator(values, used).fit(cpm, initial, n_rounds, found)
    return pd.DataFrame(fit.proportions, index=bulk.obs_names.copy(), columns=signature.columns)


def markers(
    reference: AnnData,
    labels_key: str,
    n_genes: int = DEFAULT_MARKERS_PER_TYPE,
    min_log_fold_change: float = MIN_LOG_FOLD_CHANGE,
    layer: str | None = None,
    max_cells_per_type: int | None = MAX_CELLS_PER_TYPE,
) -> pd.Series:
    """Each type's markers, found in its cells: the genes ``HPVADE(genes="markers")`` fits
    on (scanpy's Wilcoxon test of each type against all other cells).

    Parameters
    ----------
    reference
        Log1p-normalised cells (not modified).
    labels_key
        Column of ``reference.obs`` with cell-type labels.
    n_genes
        Markers per type: the best ranked with a log2 fold change above
        ``min_log_fold_change`` (relaxed for a type with fewer than five).
    layer
        Layer with the log1p values; ``None``: ``X``.
    max_cells_per_type
        Cells per type ranked (a random subset above it, seed 0); ``None``: all.

    Returns
    -------
    Series mapping each marker to its type, type by type.
    """
    codes, categories = get_label_codes(reference, labels_key)
    matrix = get_matrix(reference, layer)
    return wilcoxon_markers(
        matrix,
        codes,
        categories,
        reference.var_names,
        n_genes,
        min_log_fold_change,
        max_cells_per_type=max_cells_per_type,
    )


def signature_markers(signature: pd.DataFrame, n_genes: int = 5) -> pd.Series:
    """Each type's markers, read off a signature (for plots of S; :func:`markers` finds them
    in the cells): the largest log fold change of S against the highest other type.

    Parameters
    ----------
    signature
        Genes × types signature (CPM), e.g. from :func:`hpvade.pp.build_signature`.
    n_genes
        Genes per type.

    Returns
    -------
    Series mapping each selected gene to its type, grouped by type in column order.
    """
    values = np.log1p(signature.to_numpy(dtype=float))
    fold = np.empty_like(values)
    for j in range(values.shape[1]):
        fold[:, j] = values[:, j] - np.delete(values, j, axis=1).max(axis=1)
    chosen, owners = [], []
    for j, column in enumerate(signature.columns):
        order = np.argsort(-fold[:, j], kind="stable")
        picked = [g for g in order if signature.index[g] not in chosen][:n_genes]
        chosen += [signature.index[g] for g in picked]
        owners += [column] * len(picked)
    return pd.Series(owners, index=pd.Index(chosen, name="gene"), name="cell_type")


def marker_genes(signature: pd.DataFrame, n_genes: int = 5) -> pd.Series:
    """Deprecated name of :func:`signature_markers`; removed in 0.3."""
    warnings.warn(
        "`hpvade.tl.marker_genes` was renamed `hpvade.tl.signature_markers` (markers read off a "
        "signature; the model's own markers, `selected_genes_`, come from a test on the "
        "cells); the old name stops working in 0.3.",
        FutureWarning,
        stacklevel=2,
    )
    return signature_markers(signature, n_genes)
