"""Tools that compute on model outputs (scanpy style); plots are in :mod:`hpvade.pl`."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["marker_genes"]


def marker_genes(signature: pd.DataFrame, n_genes: int = 5) -> pd.Series:
    """Top ``n_genes`` marker genes per type: largest log fold change of S against the highest
    other type (so a marker is specific, not only above average).

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
