"""What a registered reference gives a model once, at construction: S, the cells and RNA
content of each type, and the genes of the proportion fit and of the networks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from hpvade.data._genes import (
    resolve_gene_selection,
    resolve_vae_genes,
    variable_genes,
    wilcoxon_markers,
)
from hpvade.data._matrix import get_matrix
from hpvade.data._pseudobulk import mean_per_type
from hpvade.data._signature import cpm_columns, type_sums_and_cell_totals, warn_if_flat
from hpvade.data._simulator import PseudobulkSimulator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSummary:
    """A reference, summarised (the model keeps each field as a ``_``-ending attribute).

    Attributes
    ----------
    signature
        S (genes × types, CPM): each type's summed linear expression, columns scaled to 1e6.
    type_cell_counts
        Reference cells of each type.
    rna_content
        Mean counts per cell of each type (with a count layer; ``None`` otherwise).
    selected_genes
        Genes of the proportion fit.
    """

    signature: np.ndarray
    type_cell_counts: np.ndarray
    rna_content: np.ndarray | None
    selected_genes: pd.Index


def summarise_reference(
    simulator: PseudobulkSimulator,
    var_names: pd.Index,
    cell_types: pd.Index,
    log_layer: str | None,
    genes,
    stacklevel: int = 2,
) -> ReferenceSummary:
    """S, the per-type cells and RNA content, and the fit's genes from ``genes`` (see
    :class:`~hpvade.HPVADE`), from the simulator's reference: the linear values are read
    once for S and each cell's total (kept by the simulator for the calibrations)."""
    adata, codes, n_types = simulator.adata, simulator.codes, len(cell_types)
    sums, totals = type_sums_and_cell_totals(
        adata, codes, n_types, simulator.layer, simulator.log1p
    )
    simulator.set_cell_totals(totals)
    signature = cpm_columns(sums)
    warn_if_flat(signature, stacklevel=stacklevel + 1)
    content = None if simulator.log1p else mean_per_type(totals, codes, n_types)
    markers = lambda: wilcoxon_markers(get_matrix(adata, log_layer), codes, cell_types, var_names)
    selected = resolve_gene_selection(genes, var_names, markers)
    logger.info("The proportion fit uses %d of %d genes.", len(selected), adata.n_vars)
    return ReferenceSummary(signature, np.bincount(codes, minlength=n_types), content, selected)


def select_vae_genes(
    vae_genes, var_names: pd.Index, adata: AnnData | None, log_layer: str | None, markers
) -> np.ndarray | None:
    """Indices of the genes the networks model (see ``vae_genes`` of
    :class:`~hpvade.HPVADE`); ``None``: all."""
    index = resolve_vae_genes(
        vae_genes,
        var_names,
        lambda n: variable_genes(adata, log_layer, n),
        pd.Index([]) if markers is None else markers,
    )
    n_genes = len(var_names) if index is None else index.size
    logger.info("The VAE models %d of %d genes.", n_genes, len(var_names))
    return index
