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
