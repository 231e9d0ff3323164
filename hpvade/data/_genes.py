"""Which genes the proportion fit uses: per-type markers chosen from the reference."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hpvade.data._matrix import iter_row_chunks

logger = logging.getLogger(__name__)

#: Markers kept per type, and the smallest log2 fold change a marker needs (chosen on real
#: PBMC bulk against flow cytometry, ``benchmarks/real.py``).
DEFAULT_MARKERS_PER_TYPE = 50
MIN_LOG_FOLD_CHANGE = 1.0
#: Cells of each type that the test ranks (a random subset above this): the ranking is
#: settled long before, and the test's cost grows with cells × genes.
MAX_CELLS_PER_TYPE = 500
#: A type with fewer markers than this passing the fold change takes its best-ranked genes.
MIN_MARKERS_PER_TYPE = 5


def wilcoxon_markers(
    matrix,
    codes: np.ndarray,
    categories: pd.Index,
    genes: pd.Index,
    n_genes: int = DEFAULT_MARKERS_PER_TYPE,
    min_log_fold_change: float = MIN_LOG_FOLD_CHANGE,
    max_cells_per_type: int | None = MAX_CELLS_PER_TYPE,
    seed: int = 0,
) -> pd.Series:
    """Per-type markers: scanpy's Wilcoxon test of each type against all other cells.

    Parameters
    ----------
    matrix
        Cells × genes, log1p-normalised (dense or sparse; not modified).
    codes
        Integer type of each cell (index into ``categories``).
    categories
        Type names.
    genes
        Gene names (columns of ``matrix``).
    n_genes
        Markers kept per type: the best ranked with a log2 fold change above
        ``min_log_fold_change`` (at least ``MIN_MARKERS_PER_TYPE``, relaxing the fold change
        for a type that has too few).
    min_log_fold_change
        Minimum log2 fold change of a marker against the other cells.
    max_cells_per_type
        Cells per type ranked (a random subset above it); ``None``: all.
    seed
        Seed of that subset.

    Returns
    -------
    Series mapping each marker to the type it marks (a gene marks at most one type), in
    type order.
    """
    import scanpy as sc

    rng = np.random.default_rng(seed)
    cells = np.arange(codes.size)
    if max_cells_per_type is not None:
        cells = np.concatenate(
            [
                rng.permutation(np.flatnonzero(codes == t))[:max_cells_per_type]
                for t in range(len(categories))
            ]
        )
        cells.sort()
    labels = pd.Categorical.from_codes(codes[cells], categories=pd.Index(categories).astype(str))
    adata = AnnData(
        matrix[cells],
        obs=pd.DataFrame({"type": labels}, index=np.arange(cells.size).astype(str)),
        var=pd.DataFrame(index=pd.Index(genes).astype(str)),
    )
    present = [str(c) for c in adata.obs["type"].cat.categories if (adata.obs["type"] == c).any()]
    sc.tl.rank_genes_groups(
        adata, "type", groups=present, method="wilcoxon", use_raw=False, tie_correct=False
    )
    chosen: dict[str, str] = {}
    for group in present:
        table = sc.get.rank_genes_groups_df(adata, group)
        table = table[~table["names"].isin(list(chosen))]
        passing = table[table["logfoldchanges"] > min_log_fold_change]["names"].head(n_genes)
        if len(passing) < MIN_MARKERS_PER_TYPE:
            logger.info(
                "Type %r has %d markers with log2 fold change > %g; taking its %d best-ranked "
                "genes.", group, len(passing), min_log_fold_change, MIN_MARKERS_PER_TYPE,
            )  # fmt: skip
            passing = table["names"].head(MIN_MARKERS_PER_TYPE)
        chosen.update(dict.fromkeys(passing, group))
    return pd.Series(chosen, name="cell_type").rename_axis("gene")


def resolve_gene_selection(genes, var_names: pd.Index, markers) -> pd.Index:
    """The genes a model fits on, from its ``genes`` argument.

    ``"markers"``: ``markers()`` (called only then); ``"all"``: every reference gene; a list:
    those genes, which must all be reference genes.
    """
    if isinstance(genes, str):
        if genes == "markers":
            return pd.Index(markers().index)
        if genes == "all":
            return pd.Index(var_names)
        raise ValueError(
            f'`genes` must be "markers", "all" or a list of gene names, got {genes!r}.'
        )
    chosen = pd.Index([str(g) for g in genes]).unique()
    unknown = chosen.difference(var_names)
    if len(unknown):
        raise ValueError(
            f"{len(unknown)} of the {len(chosen)} genes given are not reference genes (e.g. "
            f"{unknown[:5].tolist()}); pass genes from `adata.var_names`."
        )
    if len(chosen) < 2:
        raise ValueError("`genes` must name at least 2 reference genes.")
    return chosen


#: Most genes the VAE models by default; a reference with more keeps its most variable genes
#: and the markers (S and the deconvolution network keep every gene).
MAX_VAE_GENES = 8000


def variable_genes(adata: AnnData, layer: str | None, n_genes: int) -> np.ndarray:
    """Indices of the ``n_genes`` genes whose log1p values vary most across cells, the most
    variable first, read a chunk of cells at a time (sparse or backed references are never
    densified)."""
    total = np.zeros(adata.n_vars)
    squares = np.zeros(adata.n_vars)
    for _, _, block in iter_row_chunks(adata, layer):
        if sp.issparse(block):
            total += np.asarray(block.sum(axis=0)).ravel()
            squares += np.asarray(block.multiply(block).sum(axis=0)).ravel()
        else:
            total += block.sum(axis=0)
            squares += np.square(block, dtype=np.float64).sum(axis=0)
    mean = total / max(adata.n_obs, 1)
    variance = squares / max(adata.n_obs, 1) - mean**2
    return np.argsort(-variance, kind="stable")[:n_genes]


def resolve_vae_genes(vae_genes, var_names: pd.Index, variable, markers: pd.Index):
    """The genes the VAE models, from the model's ``vae_genes`` argument: ``None`` for all,
    or a sorted array of indices into ``var_names``.

    ``"auto"``: all genes up to ``MAX_VAE_GENES``; above it, the markers and then the most
    variable other genes (``variable(n)``: indices, most variable first; called only then) up
    to that many. ``"all"``; an int:
    that many genes, chosen as ``"auto"`` chooses; a list of gene names.
    """
    if isinstance(vae_genes, str) and vae_genes not in ("auto", "all"):
        raise ValueError(
            f'`vae_genes` must be "auto", "all", a number of genes or a list of gene names, '
            f"got {vae_genes!r}."
        )
    if vae_genes == "all":
        return None
    if isinstance(vae_genes, str | int | np.integer):
        n_genes = MAX_VAE_GENES if vae_genes == "auto" else int(vae_genes)
        if n_genes < 2:
            raise ValueError(f"`vae_genes` must be at least 2 genes, got {n_genes}.")
        if n_genes >= len(var_names):
            return None
        chosen = np.flatnonzero(var_names.isin(markers))[:n_genes]
        ranked = np.asarray(variable(n_genes))
        extra = ranked[~np.isin(ranked, chosen)][: n_genes - chosen.size]
        return np.sort(np.concatenate([chosen, extra]).astype(np.int64))
    names = resolve_gene_selection(vae_genes, var_names, markers=None)
    return np.sort(var_names.get_indexer(names)).astype(np.int64)
