"""Pseudobulks of known composition from a registered reference: training and validation
pools, and the half splits the calibrations use."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from anndata import AnnData

from hpvade.data._labels import indicator_matrix
from hpvade.data._matrix import cpm_rows
from hpvade.data._pseudobulk import (
    DEFAULT_CELLS_PER_PSEUDOBULK,
    DEFAULT_DIRICHLET_ALPHA,
    cell_totals,
    mix_cells,
    rna_fractions,
    sample_cell_counts,
)
from hpvade.data._signature import cpm_columns
from hpvade.data._split import stratified_split


class PseudobulkSimulator:
    """Mixtures of a reference's cells, summed on the linear scale S is built on.

    Parameters
    ----------
    adata
        The registered reference (cells × genes; never densified).
    codes
        Each cell's type code (``0 .. n_types - 1``).
    n_types
        Number of cell types.
    layer, log1p
        Where the summed values are, and whether they are log1p (``X``) or counts. With
        counts, a mixture's truth is each type's share of its RNA (a cell's counts carry its
        RNA content); with log1p values, the share of its cells.
    cells_per_pseudobulk, dirichlet_alpha
        Cells summed into each pseudobulk and the Dirichlet concentration of its proportions
        (``train``'s; the calibrations draw theirs alike).
    """

    def __init__(
        self,
        adata: AnnData,
        codes: np.ndarray,
        n_types: int,
        layer: str | None,
        log1p: bool,
        cells_per_pseudobulk: int = DEFAULT_CELLS_PER_PSEUDOBULK,
        dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
    ):
        self.adata, self.codes, self.n_types = adata, codes, n_types
        self.layer, self.log1p = layer, log1p
        self.cells_per_pseudobulk = int(cells_per_pseudobulk)
        self.dirichlet_alpha = float(dirichlet_alpha)
        self._totals = None

    def cell_totals(self) -> np.ndarray:
        """Each cell's total linear expression (its RNA content with counts), computed once."""
        if self._totals is None:
            self._totals = cell_totals(self.adata, self.layer, self.log1p)
        return self._totals

    def set_cell_totals(self, totals: np.ndarray) -> None:
        """Keep each cell's total, read once with S (:func:`summarise_reference`)."""
        self._totals = np.asarray(totals, dtype=np.float64)

    def cells_by_type(self, max_per_type: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Each type's cells (sorted indices), a random subset above ``max_per_type``."""
        members = []
        for t in range(self.n_types):
            cells = np.flatnonzero(self.codes == t)
            if cells.size > max_per_type:
                cells = np.sort(rng.choice(cells, max_per_type, replace=False))
            members.append(cells)
        return members

    def mixtures(
        self, cells: np.ndarray, n_pseudobulk: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pseudobulk CPM (samples × genes) drawn from ``cells``, and their true fractions."""
        counts, fractions = sample_cell_counts(
            self.codes,
            self.n_types,
            n_pseudobulk,
            self.cells_per_pseudobulk,
            self.dirichlet_alpha,
            rng,
            cell_indices=cells,
        )
        cpm = cpm_rows(mix_cells(self.adata, counts, self.layer, self.log1p), inplace=True)
        if not self.log1p:  # counts: RNA fractions
            fractions = rna_fractions(counts, self.codes, self.n_types, self.cell_totals())
        return cpm, fractions

    def pool(
        self, cells: np.ndarray, n_pseudobulk: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training or validation pool: ``(cpm, fractions)`` as float32 tensors."""
        cpm, fractions = self.mixtures(cells, n_pseudobulk, np.random.default_rng(seed))
        as_tensor = torch.as_tensor
        return as_tensor(cpm, dtype=torch.float32), as_tensor(fractions, dtype=torch.float32)

    def half_splits(
        self, n_pseudobulk: int, rng: np.random.Generator, n_splits: int = 2
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``n_splits`` times: S from half the cells of each type, and pseudobulks of known
        composition from the other half.

        Yields ``(signature, cpm, truth)``: samples the reference explains, seen through a
        signature that never saw their cells (the calibration data of the flag and the
        intervals).
        """
        n_cells = self.codes.size
        for _ in range(n_splits):
            half, other = stratified_split(self.codes, 0.5, rng)
            indicator = indicator_matrix(self.codes[half], self.n_types, half, n_cells)
            signature = cpm_columns(mix_cells(self.adata, indicator, self.layer, self.log1p))
            cpm, truth = self.mixtures(other, n_pseudobulk, rng)
            yield signature, cpm, truth
