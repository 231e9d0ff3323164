"""Pseudobulk simulation: Dirichlet mixtures of reference cells, summed by one sparse product."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scvi import settings

from hpvade._compat import renamed_keywords
from hpvade._constants import (
    PSEUDOBULK_PROPORTIONS_KEY,
    PSEUDOBULK_RNA_PROPORTIONS_KEY,
)
from hpvade.data._kernels import add_sampled_rows
from hpvade.data._labels import get_label_codes
from hpvade.data._matrix import DEFAULT_CHUNK_SIZE, cpm_rows, iter_row_chunks, to_linear
from hpvade.data._validation import resolve_counts_layer, validate_input

logger = logging.getLogger(__name__)

#: Cells summed into a pseudobulk, and the Dirichlet concentration of its type fractions.
DEFAULT_CELLS_PER_PSEUDOBULK = 500
DEFAULT_DIRICHLET_ALPHA = 1.0


def sample_cell_counts(
    codes: np.ndarray,
    n_types: int,
    n_samples: int,
    cells_per_sample: int,
    alpha: float,
    rng: np.random.Generator,
    cell_indices: np.ndarray | None = None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Draw mixtures and return the (samples × cells) count matrix and the cell fractions.

    Proportions come from a Dirichlet over the types that have cells among ``cell_indices``
    (types without cells get 0); each sample's per-type cell numbers are multinomial, and cells
    are drawn with replacement within their type. Everything is vectorised over all draws.
    """
    n_cells = codes.shape[0]
    pool = np.arange(n_cells) if cell_indices is None else np.asarray(cell_indices)
    pool_codes = codes[pool]
    order = np.argsort(pool_codes, kind="stable")
    sizes = np.bincount(pool_codes, minlength=n_types)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    present = np.flatnonzero(sizes > 0)

    fractions = np.zeros((n_samples, n_types))
    fractions[:, present] = rng.dirichlet(np.full(present.size, alpha), size=n_samples)
    # Dirichlet draws with tiny alpha can underflow to all-zero rows; renormalise safely.
    fractions /= fractions.sum(axis=1, keepdims=True)
    type_counts = rng.multinomial(cells_per_sample, fractions)

    flat = type_counts.ravel()
    sample_of_draw = np.repeat(np.repeat(np.arange(n_samples), n_types), flat)
    type_of_draw = np.repeat(np.tile(np.arange(n_types), n_samples), flat)
    offset = np.floor(rng.random(type_of_draw.size) * sizes[type_of_draw]).astype(np.int64)
    cell_of_draw = pool[order[starts[type_of_draw] + offset]]

    counts = sp.csr_matrix(
        (np.ones(cell_of_draw.size), (sample_of_draw, cell_of_draw)),
        shape=(n_samples, n_cells),
    )
    return counts, type_counts / cells_per_sample


def cell_totals(
    adata: AnnData, layer: str | None, log1p: bool, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> np.ndarray:
    """Total linear expression of each cell (its RNA content when ``layer`` holds counts)."""
    totals = np.zeros(adata.n_obs)
    for start, stop, block in iter_row_chunks(adata, layer, chunk_size):
        totals[start:stop] = np.asarray(to_linear(block, log1p).sum(axis=1)).ravel()
    return totals


def rna_fractions(
    counts: sp.csr_matrix, codes: np.ndarray, n_types: int, totals: np.ndarray
) -> np.ndarray:
    """Each sample's share of RNA from each type: its drawn cells' totals, summed per type."""
    weights = sp.csr_matrix((totals, (np.arange(codes.size), codes)), shape=(codes.size, n_types))
    per_type = np.asarray((counts @ weights).todense())
    return per_type / np.maximum(per_type.sum(axis=1, keepdims=True), 1e-300)


def mean_per_type(values: np.ndarray, codes: np.ndarray, n_types: int) -> np.ndarray:
    """Mean of a per-cell value within each type (e.g. RNA content: counts per cell)."""
    sizes = np.bincount(codes, minlength=n_types)
    return np.bincount(codes, weights=values, minlength=n_types) / np.maximum(sizes, 1)


def mix_cells(
    adata: AnnData,
    counts: sp.csr_matrix,
    layer: str | None,
    log1p: bool,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Sum the sampled cells' linear expression: ``counts @ linear(X)``, chunked over cells.

    Each chunk's linear values are computed once; sparse chunks are summed into the dense
    result by a compiled kernel (see ``_kernels``), dense ones by a sparse × dense product.
    """
    mixed = np.zeros((counts.shape[0], adata.n_vars))
    counts = counts.tocsc()
    used = np.diff(counts.indptr) > 0
    for start, stop, block in iter_row_chunks(adata, layer, chunk_size):
        if not used[start:stop].any():
            continue
        linear = to_linear(block, log1p)
        drawn = counts[:, start:stop].tocsr()
        if sp.issparse(linear):
            add_sampled_rows(mixed, drawn, linear)
        else:
            mixed += drawn @ linear
    return mixed


@renamed_keywords(
    n_samples="n_pseudobulk", cells_per_sample="cells_per_pseudobulk", alpha="dirichlet_alpha"
)
def simulate_pseudobulk(
    adata: AnnData,
    labels_key: str,
    n_pseudobulk: int = 1000,
    cells_per_pseudobulk: int = DEFAULT_CELLS_PER_PSEUDOBULK,
    dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
    layer: str | None = None,
    seed: int | None = None,
    *,
    counts_layer: str | None = None,
    counts: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AnnData:
    """Simulate pseudobulk samples of known composition from a labelled reference.

    Each sample draws cell-type proportions from a symmetric Dirichlet(``dirichlet_alpha``),
    draws the
    number of cells of each type from a multinomial, samples that many cells of each type with
    replacement, sums their linear expression and scales the sum to CPM.

    Parameters
    ----------
    adata
        Reference (cells × genes); dense, sparse or ``backed="r"``.
    labels_key
        Column of ``adata.obs`` with cell-type labels.
    n_pseudobulk
        Number of pseudobulk samples.
    cells_per_pseudobulk
        Cells summed into each sample.
    dirichlet_alpha
        Dirichlet concentration; below 1 gives sparse mixtures.
    layer
        Layer with log1p-normalised values; ``None`` uses ``adata.X``.
    seed
        Seed of the random generator; ``None``: ``scvi.settings.seed``.
    counts_layer
        Layer with raw counts, as in :meth:`hpvade.HPVADE.setup_anndata`: when given, counts
        are summed as they are (instead of ``expm1`` of ``layer``), cells carry their own RNA
        content, and the RNA fractions are recorded next to the cell fractions.
    counts
        Deprecated (use ``counts_layer``): ``True`` means ``layer`` holds raw counts.
    chunk_size
        Cells read at a time.

    Returns
    -------
    AnnData (samples × genes) with CPM in ``X`` and the true cell fractions (sampled cells of
    each type / ``cells_per_sample``) as a DataFrame in ``obsm["proportions"]``. With
    ``counts=True`` also ``obsm["rna_proportions"]``: each type's share of the sample's counts.
    """
    if n_pseudobulk < 1 or cells_per_pseudobulk < 1:
        raise ValueError("`n_pseudobulk` and `cells_per_pseudobulk` must be positive integers.")
    if not dirichlet_alpha > 0:
        raise ValueError(f"`dirichlet_alpha` must be positive, got {dirichlet_alpha}.")
    layer, counts = resolve_counts_layer(layer, counts_layer, counts)
    codes, categories = get_label_codes(adata, labels_key)
    validate_input(adata, layer, counts)
    seed = int((settings.seed or 0) if seed is None else seed)
    rng = np.random.default_rng(seed)
    cell_counts, fractions = sample_cell_counts(
        codes, len(categories), n_pseudobulk, cells_per_pseudobulk, dirichlet_alpha, rng
    )
    mixed = cpm_rows(mix_cells(adata, cell_counts, layer, not counts, chunk_size), inplace=True)
    obs_names = pd.Index([f"pseudobulk_{i}" for i in range(n_pseudobulk)])
    result = ad.AnnData(
        X=mixed.astype(np.float32),
        obs=pd.DataFrame(index=obs_names),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    result.obsm[PSEUDOBULK_PROPORTIONS_KEY] = pd.DataFrame(
        fractions, index=obs_names, columns=categories
    )
    if counts:
        rna = rna_fractions(
            cell_counts, codes, len(categories), cell_totals(adata, layer, False, chunk_size)
        )
        result.obsm[PSEUDOBULK_RNA_PROPORTIONS_KEY] = pd.DataFrame(
            rna, index=obs_names, columns=categories
        )
    result.uns["hpvade_simulation"] = {
        "labels_key": labels_key,
        "cells_per_pseudobulk": int(cells_per_pseudobulk),
        "dirichlet_alpha": float(dirichlet_alpha),
        "seed": int(seed),
    }
    logger.info("Simulated %d pseudobulks of %d cells.", n_pseudobulk, cells_per_pseudobulk)
    return result
