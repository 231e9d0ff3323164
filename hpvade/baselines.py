"""Reference deconvolution methods to compare hpvade against."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import nnls


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
    totals = coef.sum(axis=1, keepdims=True)
    return np.divide(coef, totals, out=np.full_like(coef, 1 / coef.shape[1]), where=totals > 0)


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
    P = proportions_given(S)
    totals = P.sum(axis=1, keepdims=True)
    P = np.divide(P, totals, out=np.full_like(P, 1 / P.shape[1]), where=totals > 0)
    return P, S
