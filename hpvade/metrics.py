"""Accuracy metrics for estimated versus true proportions.

Every function takes ``pred`` and ``true``: samples × types DataFrames (``true`` is aligned to
``pred``'s index and columns) or arrays of the same shape.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _aligned(pred, true) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    if isinstance(pred, pd.DataFrame) and isinstance(true, pd.DataFrame):
        true = true.loc[pred.index, pred.columns]
        return pred.to_numpy(float), true.to_numpy(float), pred.columns
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    if pred.shape != true.shape:
        raise ValueError(f"Shapes differ: predicted {pred.shape}, true {true.shape}.")
    return pred, true, pd.RangeIndex(pred.shape[-1] if pred.ndim > 1 else 1)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x**2).sum() * (y**2).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def pearson(pred, true) -> float:
    """Pearson r over all (sample, type) pairs.

    Parameters
    ----------
    pred
        Estimated proportions (samples × types).
    true
        True proportions, same samples and types.

    Returns
    -------
    float in [-1, 1] (NaN where either side does not vary).
    """
    p, t, _ = _aligned(pred, true)
    return _pearson(p.ravel(), t.ravel())


def per_type_pearson(pred, true) -> pd.Series:
    """Pearson r of each cell type across samples (NaN where a type does not vary).

    Parameters
    ----------
    pred
        Estimated proportions (samples × types).
    true
        True proportions, same samples and types.

    Returns
    -------
    Series of r per cell type (index: the types).
    """
    p, t, columns = _aligned(pred, true)
    return pd.Series([_pearson(p[:, j], t[:, j]) for j in range(p.shape[1])], index=columns)


def rmse(pred, true) -> float:
    """Root mean squared error over all (sample, type) pairs.

    Parameters
    ----------
    pred
        Estimated proportions (samples × types).
    true
        True proportions, same samples and types.

    Returns
    -------
    float, in units of proportion.
    """
    p, t, _ = _aligned(pred, true)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def mae(pred, true) -> float:
    """Mean absolute error over all (sample, type) pairs.

    Parameters
    ----------
    pred
        Estimated proportions (samples × types).
    true
        True proportions, same samples and types.

    Returns
    -------
    float, in units of proportion.
    """
    p, t, _ = _aligned(pred, true)
    return float(np.mean(np.abs(p - t)))


def lin_ccc(pred, true) -> float:
    """Lin's concordance correlation coefficient over all (sample, type) pairs.

    Parameters
    ----------
    pred
        Estimated proportions (samples × types).
    true
        True proportions, same samples and types.

    Returns
    -------
    float in [-1, 1]: 1 only where estimate and truth agree exactly.
    """
    p, t, _ = _aligned(pred, true)
    p, t = p.ravel(), t.ravel()
    cov = np.mean((p - p.mean()) * (t - t.mean()))
    return float(2 * cov / (p.var() + t.var() + (p.mean() - t.mean()) ** 2))


def evaluate(pred, true) -> dict[str, float]:
    """All summary metrics: overall r, mean per-type r, Lin's CCC, RMSE, MAE.

    Parameters
    ----------
    pred
        Estimated proportions (samples × types).
    true
        True proportions, same samples and types.

    Returns
    -------
    dict with keys ``"r"``, ``"mean_type_r"``, ``"ccc"``, ``"rmse"``, ``"mae"``.
    """
    return {
        "r": pearson(pred, true),
        "mean_type_r": float(np.nanmean(per_type_pearson(pred, true).to_numpy())),
        "ccc": lin_ccc(pred, true),
        "rmse": rmse(pred, true),
        "mae": mae(pred, true),
    }
