"""Small real data sets that need no download, and the reference/test split used to evaluate."""

from __future__ import annotations

from anndata import AnnData

from hpvade._random import default_rng as _default_rng
from hpvade.data._split import random_cells_per_type as _random_cells_per_type

PBMC_LABELS_KEY = "bulk_labels"


def pbmc68k_reference() -> AnnData:
    """700 real PBMCs × 765 genes from scanpy (``pbmc68k_reduced().raw``), log1p-normalised.

    Returns
    -------
    AnnData (700 cells × 765 genes): sparse log1p-normalised ``X``, cell-type labels (10
    types) in ``obs["bulk_labels"]``. Shipped with scanpy: no download.
    """
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    reference = adata.raw.to_adata()
    reference.obs = reference.obs[[PBMC_LABELS_KEY]].copy()
    reference.uns = {}
    reference.obsm.clear()
    reference.obsp.clear()
    return reference


def split_by_type(
    adata: AnnData, labels_key: str, fraction: float = 0.5, seed: int | None = None
) -> tuple[AnnData, AnnData]:
    """Split cells into two AnnData, stratified by type (``fraction`` of each type goes first).

    Each type keeps at least one cell in each part where it has two or more cells.

    Parameters
    ----------
    adata
        Labelled cells.
    labels_key
        Column of ``adata.obs`` with cell-type labels.
    fraction
        Share of each type's cells that goes to the first part.
    seed
        Seed of the random permutation; ``None``: ``scvi.settings.seed``.

    Returns
    -------
    ``(first, second)`` AnnData copies; every cell is in exactly one of them.
    """
    codes = adata.obs[labels_key].astype("category").cat.codes.to_numpy()
    first = _random_cells_per_type(
        codes,
        lambda n: min(max(int(round(fraction * n)), 1), max(n - 1, 1)),
        _default_rng(seed),
    )
    return adata[first].copy(), adata[~first].copy()
