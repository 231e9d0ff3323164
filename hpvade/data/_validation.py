"""Checks on a reference before it is registered."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from hpvade.data._matrix import iter_row_chunks

#: log1p-normalised data stays well below this; raw counts routinely exceed it.
LOG1P_MAX = 20.0


def _values(block) -> np.ndarray:
    return block.data if sp.issparse(block) else np.asarray(block).ravel()


def validate_reference(adata: AnnData, layer: str | None, counts_layer: str | None) -> None:
    """Refuse negative or non-finite values; warn when X looks like raw counts.

    Reads the matrix in row chunks, so it works on large and backed references.
    """
    where = f"`adata.layers[{layer!r}]`" if layer else "`adata.X`"
    all_integer, maximum = True, 0.0
    for _, _, block in iter_row_chunks(adata, layer):
        values = _values(block)
        if values.size == 0:
            continue
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{where} contains NaN or infinite values; remove or impute them.")
        if values.min() < 0:
            raise ValueError(
                f"{where} contains negative values. hpvade expects log1p-normalised expression "
                "(`sc.pp.normalize_total(adata); sc.pp.log1p(adata)`), not scaled data."
            )
        maximum = max(maximum, float(values.max()))
        all_integer = all_integer and np.array_equal(values, np.round(values))
    if all_integer and maximum > 0:
        warnings.warn(
            f"{where} holds integer values (max {maximum:g}): it looks like raw counts, but "
            "hpvade expects log1p-normalised expression there. Keep the counts in a layer and "
            "normalise X: `adata.layers['counts'] = adata.X.copy(); sc.pp.normalize_total(adata); "
            "sc.pp.log1p(adata)`, then `setup_anndata(adata, ..., counts_layer='counts')`.",
            UserWarning,
            stacklevel=3,
        )
    elif maximum > LOG1P_MAX:
        warnings.warn(
            f"{where} reaches {maximum:g}, more than log1p-normalised data does: it may be "
            "normalised but not log-transformed. Apply `sc.pp.log1p(adata)` first.",
            UserWarning,
            stacklevel=3,
        )
    if counts_layer is not None:
        for _, _, block in iter_row_chunks(adata, counts_layer):
            values = _values(block)
            if values.size and (not np.all(np.isfinite(values)) or values.min() < 0):
                raise ValueError(
                    f"`adata.layers[{counts_layer!r}]` must hold non-negative raw counts."
                )
