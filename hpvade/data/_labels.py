"""Cell-type labels as integer codes, with the checks every entry point shares."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def get_label_codes(adata: AnnData, labels_key: str) -> tuple[np.ndarray, pd.Index]:
    """Return ``(codes, categories)`` for ``adata.obs[labels_key]``, refusing unusable labels.

    Categories are always strings; numeric labels (codes) get a warning.

    Raises
    ------
    KeyError
        The key is not a column of ``adata.obs``.
    ValueError
        Labels contain missing values, a category has no cells, or fewer than two types remain.
    """
    if labels_key not in adata.obs:
        raise KeyError(
            f"labels_key {labels_key!r} is not a column of `adata.obs` "
            f"(columns: {list(adata.obs.columns)}). Pass the column that holds cell-type labels."
        )
    labels = adata.obs[labels_key]
    if labels.isna().any():
        n_na = int(labels.isna().sum())
        raise ValueError(
            f"{n_na} cells have a missing label in `adata.obs[{labels_key!r}]`. Remove them "
            f"first, e.g. `adata = adata[adata.obs[{labels_key!r}].notna()].copy()`."
        )
    categorical = labels.astype("category")
    if pd.api.types.is_numeric_dtype(categorical.cat.categories):
        warnings.warn(
            f"`adata.obs[{labels_key!r}]` holds numbers ({list(categorical.cat.categories[:5])}"
            f"{', ...' if len(categorical.cat.categories) > 5 else ''}), which look like "
            "cluster or label codes: signature and proportion columns will be named by them, "
            "as strings. Map the codes to cell-type names first if you have them.",
            UserWarning,
            stacklevel=3,
        )
    counts = categorical.value_counts(sort=False)
    empty = counts.index[counts.to_numpy() == 0].tolist()
    if empty:
        raise ValueError(
            f"Cell types {empty} in `adata.obs[{labels_key!r}]` have no cells. Drop unused "
            f"categories first: `adata.obs[{labels_key!r}] = "
            f"adata.obs[{labels_key!r}].cat.remove_unused_categories()`."
        )
    if len(counts) < 2:
        raise ValueError(
            f"Deconvolution needs at least two cell types; `adata.obs[{labels_key!r}]` has "
            f"{len(counts)}."
        )
    return categorical.cat.codes.to_numpy().astype(np.int64), pd.Index(
        categorical.cat.categories.astype(str)
    )


def indicator_matrix(
    codes: np.ndarray,
    n_types: int,
    cells: np.ndarray | None = None,
    n_cells: int | None = None,
) -> sp.csr_matrix:
    """Sparse (types × cells) 0/1 matrix: row ``t`` selects the cells of type ``t``.

    ``codes[i]`` is the type of cell ``cells[i]`` (``cells``: ``None`` for all cells in order)
    among ``n_cells`` columns (default: one per code); other columns stay empty.
    """
    columns = np.arange(codes.shape[0]) if cells is None else np.asarray(cells)
    n_cells = codes.shape[0] if n_cells is None else n_cells
    return sp.csr_matrix((np.ones(columns.size), (codes, columns)), shape=(n_types, n_cells))
