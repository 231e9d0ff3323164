"""What the model reads from its registered reference: names, labels, pseudobulks."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings

from hpvade._constants import GENE_REPORT_KEY
from hpvade.core import ProportionEstimator
from hpvade.data._bulk import bulk_to_cpm, gene_mismatch_hint, gene_report, on_signature_scale
from hpvade.data._genes import (
    resolve_gene_selection,
    resolve_vae_genes,
    variable_genes,
    wilcoxon_markers,
)
from hpvade.data._labels import indicator_matrix
from hpvade.data._matrix import get_matrix
from hpvade.data._pseudobulk import (
    DEFAULT_CELLS_PER_PSEUDOBULK,
    DEFAULT_DIRICHLET_ALPHA,
    cell_totals,
    cpm_rows,
    mean_per_type,
    mix_cells,
    rna_fractions,
    sample_cell_counts,
)
from hpvade.data._signature import aggregate_by_type, cpm_columns, warn_if_flat
from hpvade.data._split import stratified_split

logger = logging.getLogger(__name__)

#: A bulk may lack this share of the selected genes before a warning (the fit uses the rest).
MISSING_SELECTED_WARN = 0.1
#: Fewest selected genes a bulk must have, per cell type, to be deconvolved.
MIN_FIT_GENES_PER_TYPE = 3


class ReferenceMixin:
    """Registry lookups, pseudobulk simulation from the registered reference, the served S
    and estimator, and the checks every call that takes a bulk shares."""

    @property
    def cell_types(self) -> pd.Index:
        """Cell-type names, in the order of the signature columns."""
        mapping = self.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        return pd.Index(np.asarray(mapping).astype(str))

    @property
    def var_names(self) -> pd.Index:
        """Reference genes, in the order of the signature rows."""
        return pd.Index(np.asarray(self.get_state_registry(REGISTRY_KEYS.X_KEY).column_names))

    def _init_reference_summaries(self, genes) -> np.ndarray:
        """Set ``type_cell_counts_``, ``rna_content_``, ``selected_genes_`` (from ``genes``)
        and ``reference_signature_``; return the reference signature."""
        codes, n_labels = self._label_codes(), self.summary_stats.n_labels
        layer, log1p = self._linear_source()
        signature = cpm_columns(aggregate_by_type(self.adata, codes, n_labels, layer, log1p))
        warn_if_flat(signature, stacklevel=settings.warnings_stacklevel + 1)
        self.type_cell_counts_ = np.bincount(codes, minlength=n_labels)
        if not log1p:  # a count layer: mean counts per cell of each type (RNA content)
            self.rna_content_ = mean_per_type(self._cell_totals(), codes, n_labels)
        self.selected_genes_ = self._select_genes(genes)
        self.reference_signature_ = signature
        return signature

    def _select_genes(self, genes) -> pd.Index:
        """The genes of the proportion fit (see ``genes`` of :class:`~hpvade.HPVADE`)."""
        log_matrix = get_matrix(self.adata, self.registry_["setup_args"].get("layer"))
        selected = resolve_gene_selection(
            genes,
            self.var_names,
            lambda: wilcoxon_markers(
                log_matrix, self._label_codes(), self.cell_types, self.var_names
            ),
        )
        logger.info("The proportion fit uses %d of %d genes.", len(selected), self.adata.n_vars)
        return selected

    def _select_vae_genes(self, vae_genes) -> np.ndarray | None:
        """Indices of the genes the VAE models (see ``vae_genes`` of :class:`~hpvade.HPVADE`);
        ``None``: all."""
        layer = self.registry_["setup_args"].get("layer")
        markers = self.selected_genes_ if self.selected_genes_ is not None else pd.Index([])
        index = resolve_vae_genes(
            vae_genes,
            self.var_names,
            lambda n: variable_genes(self.adata, layer, n),
            markers,
        )
        n_genes = len(self.var_names) if index is None else index.size
        logger.info("The VAE models %d of %d genes.", n_genes, len(self.var_names))
        return index

    def _fit_gene_index(self, found: np.ndarray | None = None) -> np.ndarray:
        """Row indices of the selected genes (that the bulk has, given ``found``); every gene
        for a model saved before gene selection."""
        if self.selected_genes_ is None:
            mask = np.ones(len(self.var_names), dtype=bool)
        else:
            mask = np.asarray(self.var_names.isin(self.selected_genes_))
        return np.flatnonzero(mask if found is None else mask & found)

    def _cells_by_type(self, max_per_type: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Each type's reference cells (sorted indices), a random subset above
        ``max_per_type``."""
        codes = self._label_codes()
        members = []
        for t in range(self.summary_stats.n_labels):
            cells = np.flatnonzero(codes == t)
            if cells.size > max_per_type:
                cells = np.sort(rng.choice(cells, max_per_type, replace=False))
            members.append(cells)
        return members

    def _require_reference(self, what: str) -> None:
        if self.adata is None:
            raise RuntimeError(
                f"{what} needs the reference the model was trained on: "
                "`hpvade.HPVADE.load(path, adata=ref)`."
            )

    def _label_codes(self) -> np.ndarray:
        codes = self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY)
        return np.asarray(codes).ravel().astype(np.int64)

    def _linear_source(self) -> tuple[str | None, bool]:
        """(layer, is_log1p) of the data that is summed into S and into pseudobulks."""
        counts_layer = self.registry_["setup_args"].get("counts_layer")
        if counts_layer is not None:
            return counts_layer, False
        return self.registry_["setup_args"].get("layer"), True

    def _cell_totals(self) -> np.ndarray:
        if getattr(self, "_cell_totals_cache", None) is None:
            self._cell_totals_cache = cell_totals(self.adata, *self._linear_source())
        return self._cell_totals_cache

    def _simulate_mixtures(
        self,
        cells: np.ndarray,
        n_pseudobulk: int,
        cells_per_pseudobulk: int,
        dirichlet_alpha: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pseudobulk CPM from ``cells`` and their true mixture fractions.

        With a count layer, counts carry each cell's RNA content, so the mixture's shares are
        RNA fractions; otherwise they are the cell fractions.
        """
        codes, n_types = self._label_codes(), self.summary_stats.n_labels
        counts, fractions = sample_cell_counts(
            codes,
            n_types,
            n_pseudobulk,
            cells_per_pseudobulk,
            dirichlet_alpha,
            rng,
            cell_indices=cells,
        )
        cpm = cpm_rows(mix_cells(self.adata, counts, *self._linear_source()), inplace=True)
        if self.rna_content_ is not None:
            fractions = rna_fractions(counts, codes, n_types, self._cell_totals())
        return cpm, fractions

    def _simulate_pool(
        self,
        cells: np.ndarray,
        n_pseudobulk: int,
        cells_per_pseudobulk: int,
        dirichlet_alpha: float,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training or validation pool: ``(cpm, fractions)`` as float32 tensors."""
        rng = np.random.default_rng(seed)
        cpm, fractions = self._simulate_mixtures(
            cells, n_pseudobulk, cells_per_pseudobulk, dirichlet_alpha, rng
        )
        return (
            torch.as_tensor(cpm, dtype=torch.float32),
            torch.as_tensor(fractions, dtype=torch.float32),
        )

    def _pseudobulk_settings(self) -> tuple[int, float]:
        """``(cells_per_pseudobulk, dirichlet_alpha)`` of the last ``train`` (calibration
        pseudobulks are drawn as the training ones were)."""
        settings = self.pseudobulk_settings_ or {}
        return (
            int(settings.get("cells_per_pseudobulk", DEFAULT_CELLS_PER_PSEUDOBULK)),
            float(settings.get("dirichlet_alpha", DEFAULT_DIRICHLET_ALPHA)),
        )

    def _half_split_pseudobulks(
        self, n_pseudobulk: int, rng: np.random.Generator, n_splits: int = 2
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``n_splits`` times: a signature from half the cells of each type, and pseudobulks
        of known composition from the other half.

        Yields ``(signature, cpm, truth)``: the half signature (genes × types), pseudobulk CPM
        and their true mixture fractions. Samples the reference explains, seen through a
        signature that never saw their cells: the calibration data of the flag and the
        intervals.
        """
        self._require_reference("Calibration")
        codes = self._label_codes()
        n_types = self.summary_stats.n_labels
        for _ in range(n_splits):
            half, other = stratified_split(codes, 0.5, rng)
            indicator = indicator_matrix(codes[half], n_types, half, codes.size)
            signature = cpm_columns(mix_cells(self.adata, indicator, *self._linear_source()))
            cpm, truth = self._simulate_mixtures(
                other, n_pseudobulk, *self._pseudobulk_settings(), rng
            )
            yield signature, cpm, truth

    def _served_signature(self) -> np.ndarray:
        """The S that proportions are fitted with (genes × types, float64): adapt's exactly
        after ``adapt``, otherwise the module's."""
        if self.adapted_signature_ is not None:
            return np.asarray(self.adapted_signature_, dtype=np.float64)
        return self.module.signature_array()

    @torch.inference_mode()
    def get_signature(self) -> pd.DataFrame:
        """The signature S being served.

        Returns
        -------
        DataFrame (genes × cell types), CPM: columns sum to 1e6 (after :meth:`adapt`, as its
        regression left them, within a few per mille).
        """
        signature = self._served_signature()
        return pd.DataFrame(signature, index=self.var_names, columns=self.cell_types)

    def estimator(self) -> ProportionEstimator:
        """The proportion estimator being served: S (as :meth:`get_signature`), the genes the
        robust fit uses (``selected_genes_``) and, after :meth:`adapt`, the gene weights of
        the weighted fit. Its ``fit(cpm, initial)`` is what :meth:`get_proportions` runs,
        started from the deconvolution network's output, on the model's device (a GPU when
        the model is on one).

        Returns
        -------
        :class:`~hpvade.core.ProportionEstimator` (see the API reference's last section).
        """
        fit_genes = np.zeros(len(self.var_names), dtype=bool)
        fit_genes[self._fit_gene_index()] = True
        weights = None if self.gene_weights_ is None else np.asarray(self.gene_weights_, float)
        return ProportionEstimator(
            self._served_signature(), fit_genes, weights, device=str(self.device)
        )

    def _bulk_cpm(
        self, bulk: AnnData, layer: str | None, allow_missing: bool = False
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """Checks shared by every method that takes a bulk; its CPM on the model's genes,
        which of them it has (with ``allow_missing``, missing genes are 0) and the gene report
        (written to the bulk by ``get_proportions`` only)."""
        self._check_if_trained(warn=False, message=self._not_trained_message)
        if bulk.is_view:
            raise ValueError(
                "`bulk` is a view of another AnnData; results are written to its obsm and obs. "
                "Pass a copy: `bulk = bulk[mask].copy()`."
            )
        found = np.asarray(self.var_names.isin(bulk.var_names))
        if allow_missing and not found.all():  # the genes' names first, then their values
            self._check_missing_genes(bulk, found)
        cpm = bulk_to_cpm(bulk, self.var_names, layer, allow_missing)
        report = gene_report(bulk, self.var_names, cpm, self.selected_genes_)
        if not found.all():
            on_signature_scale(cpm, self._served_signature(), found)
        logger.info(
            "Genes: %d of %d reference genes found, %d extra bulk genes ignored, %d reference "
            "genes zero in every sample.",
            report["n_found"],
            report["n_reference_genes"],
            report["n_extra_ignored"],
            report["n_all_zero"],
        )
        return cpm, found, report

    def _check_missing_genes(self, bulk: AnnData, found: np.ndarray) -> None:
        n_selected = self._fit_gene_index().size
        n_used = self._fit_gene_index(found).size
        needed = MIN_FIT_GENES_PER_TYPE * len(self.cell_types)
        if n_used < needed:
            raise ValueError(
                f"The bulk has {n_used} of the model's {n_selected} selected genes; at least "
                f"{needed} ({MIN_FIT_GENES_PER_TYPE} a cell type) are needed. The model's genes "
                f"are e.g. {self.var_names[:3].tolist()}, the bulk's var_names e.g. "
                f"{bulk.var_names[:3].tolist()}."
                + (
                    gene_mismatch_hint(bulk, self.var_names)
                    or " Name the bulk's genes as the reference's are, or train a model on the "
                    "genes the bulk has."
                )
            )
        if n_used < (1 - MISSING_SELECTED_WARN) * n_selected:
            warnings.warn(
                f"The bulk lacks {n_selected - n_used} of the model's {n_selected} selected genes "
                f'(see bulk.uns["{GENE_REPORT_KEY}"]["selected_missing"]); the proportions are '
                "fitted on the rest.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel + 3,
            )
