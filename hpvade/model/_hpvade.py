"""The HPVADE model: construction, setup, training, loading (the rest lives in mixins, one
concept a file; fitted state is declared in ``_fitted_state``)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin, VAEMixin
from scvi.utils import setup_anndata_dsp

from hpvade._compat import renamed_keywords
from hpvade._constants import COUNTS_KEY
from hpvade._logging import interactive_output, quiet_third_party, without_progress_bars
from hpvade.data._labels import get_label_codes
from hpvade.data._pseudobulk import DEFAULT_CELLS_PER_PSEUDOBULK, DEFAULT_DIRICHLET_ALPHA
from hpvade.data._reference import select_vae_genes, summarise_reference
from hpvade.data._simulator import PseudobulkSimulator
from hpvade.data._split import stratified_split
from hpvade.data._validation import (
    check_counts_layer,
    check_matches_registry,
    validate_reference,
    warn_on_sparse_types_genes_and_cells,
)
from hpvade.model._adaptation import AdaptationMixin
from hpvade.model._calibration import CalibrationMixin
from hpvade.model._deconvolution import DeconvolutionMixin
from hpvade.model._expression import ExpressionMixin
from hpvade.model._fitted_state import reset_fitted_state
from hpvade.module import HPVADEModule
from hpvade.train import HPVADETrainingPlan, max_epochs_heuristic

logger = logging.getLogger(__name__)


class HPVADE(
    DeconvolutionMixin,
    ExpressionMixin,
    CalibrationMixin,
    AdaptationMixin,
    VAEMixin,
    UnsupervisedTrainingMixin,
    BaseModelClass,
):
    """Hierarchical Prototype Variational Autoencoder for bulk deconvolution.

    Which part produces which output: proportions come from a robust weighted least-squares fit
    of each bulk to the reference signature S (genes × types, CPM;
    :func:`hpvade.tl.fit_proportions` without a model), started from the deconvolution
    network's output; each sample's cell-type expression comes from the VAE's cell states;
    intervals from signature draws under the VAE posterior.

    Parameters
    ----------
    adata
        Reference registered with :meth:`setup_anndata`.
    registry
        Saved registry, used by :meth:`load` when no AnnData is given.
    n_hidden, n_latent, n_layers, dropout_rate
        Hidden units per layer, latent dimensions, hidden layers of the encoder and decoder,
        and the networks' dropout rate (scvi-tools' names and defaults).
    genes
        Genes of the proportion fit (``selected_genes_``): ``"markers"`` (Wilcoxon markers of
        the reference, 50 a type), ``"all"``, or a list. S and the networks keep every gene.
    vae_genes
        Genes the networks (VAE, deconvolution network) model: ``"auto"`` (all up to 8,000;
        above, the markers and the most variable genes), ``"all"``, a number, or a list.
    **module_kwargs
        Passed to :class:`~hpvade.module.HPVADEModule` (loss weights, ``n_layers_deconv``, ...).

    Attributes
    ----------
    cell_types
        Cell-type names, in the order of S's columns and of every proportions table.
    var_names
        Reference genes, in the order of S's rows.
    selected_genes_
        Genes of the proportion fit (``genes``).
    reference_signature_
        S built from the reference (genes × types, CPM).
    rna_content_
        Mean raw counts per cell of each type (with a count layer; ``None`` otherwise).
    scale_check_
        The first training batch's scale check: ``p @ S.T`` against the pseudobulks.
    unexplained_threshold_
        Threshold of ``obs["hpvade_unexplained"]``, calibrated after ``train`` and ``adapt``.
    interval_scale_
        Per-type factors of the 90 % intervals (``get_proportions(n_draws=...)``).
    adaptation_, gene_weights_
        Summary of the last :meth:`adapt`, and its per-gene weights (``None``: not adapted).
    state_evidence_
        Per type, how far the last :meth:`get_cell_type_expression` followed its states.

    Examples
    --------
    >>> hpvade.HPVADE.setup_anndata(ref, labels_key="cell_type")
    >>> model = hpvade.HPVADE(ref)
    >>> model.train()
    >>> props = model.get_proportions(bulk)
    """

    _module_cls = HPVADEModule
    _training_plan_cls = HPVADETrainingPlan
    _not_trained_message = "The model is not trained yet: call `model.train()` first."

    @property
    def simulator(self) -> PseudobulkSimulator:
        """Pseudobulks of known composition from the registered reference, drawn as
        :meth:`train` drew its own: ``pool`` (training pools), ``mixtures``, ``half_splits``
        (the calibrations')."""
        if self.adata is None:
            raise RuntimeError(
                "This needs the reference the model was trained on: "
                "`hpvade.HPVADE.load(path, adata=ref)`."
            )
        if self._simulator is None or self._simulator.adata is not self.adata:
            codes = self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY)
            setup_args = self.registry_["setup_args"]
            counts_layer = setup_args.get("counts_layer")
            self._simulator = PseudobulkSimulator(
                self.adata,
                np.asarray(codes).ravel().astype(np.int64),
                self.summary_stats.n_labels,
                counts_layer if counts_layer is not None else setup_args.get("layer"),
                log1p=counts_layer is None,
            )
        settings_ = self.pseudobulk_settings_ or {}
        self._simulator.cells_per_pseudobulk = int(
            settings_.get("cells_per_pseudobulk", DEFAULT_CELLS_PER_PSEUDOBULK)
        )
        self._simulator.dirichlet_alpha = float(
            settings_.get("dirichlet_alpha", DEFAULT_DIRICHLET_ALPHA)
        )
        return self._simulator

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 32,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        genes: str | list[str] = "markers",
        vae_genes: str | int | list[str] = "auto",
        **module_kwargs,
    ):
        super().__init__(adata, registry)
        n_labels = self.summary_stats.n_labels
        fields = self.registry_["field_registries"]
        mapping = fields[REGISTRY_KEYS.LABELS_KEY]["state_registry"]["categorical_mapping"]
        self.cell_types = pd.Index(np.asarray(mapping).astype(str))
        self.var_names = pd.Index(
            np.asarray(fields[REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"])
        )
        reset_fitted_state(self)
        setup_args = self.registry_["setup_args"]
        use_counts = setup_args.get("counts_layer") is not None
        self._simulator = None
        # what the reference gives once (restored by load when there is no reference)
        self.type_cell_counts_, self.rna_content_, self.selected_genes_ = None, None, None
        self.reference_signature_ = signature = None
        if adata is not None:
            summary = summarise_reference(
                self.simulator,
                self.var_names,
                self.cell_types,
                setup_args.get("layer"),
                genes,
                stacklevel=settings.warnings_stacklevel,
            )
            signature = self.reference_signature_ = summary.signature
            self.type_cell_counts_ = summary.type_cell_counts
            self.rna_content_ = summary.rna_content
            self.selected_genes_ = summary.selected_genes
        index = select_vae_genes(
            vae_genes, self.var_names, adata, setup_args.get("layer"), self.selected_genes_
        )
        if adata is not None:  # saved as chosen: loading needs neither the data nor the choice
            vae_genes = "all" if index is None else [str(g) for g in self.var_names[index]]
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            signature=signature,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            use_counts=use_counts,
            vae_genes=index,
            **module_kwargs,
        )
        self._model_summary_string = (
            f"HPVADE model: {self.summary_stats.n_vars} genes, {n_labels} cell types, "
            f"n_latent {n_latent}, n_hidden {n_hidden}."
        )
        self.init_params_ = self._get_init_params(locals())

    @renamed_keywords(pseudobulk_alpha="dirichlet_alpha")
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        n_pseudobulk: int = 4000,
        cells_per_pseudobulk: int = DEFAULT_CELLS_PER_PSEUDOBULK,
        dirichlet_alpha: float = DEFAULT_DIRICHLET_ALPHA,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        early_stopping: bool = False,
        strict_scale_check: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model on the registered reference (scvi-tools' ``train``, extended).

        Cells are split by type into training and validation cells, each part simulates its
        own pseudobulk pool, and every cell minibatch is paired with a pseudobulk minibatch.
        An adapted model first returns to its reference-trained S and network; afterwards
        the unexplained-sample flag is calibrated.

        Parameters
        ----------
        max_epochs
            Epochs; ``None``: :func:`hpvade.train.max_epochs_heuristic` (600 minibatches).
        batch_size
            Cells (and pseudobulks) per minibatch.
        n_pseudobulk, cells_per_pseudobulk, dirichlet_alpha
            Size of the training pool (validation: a fifth), cells summed into each
            pseudobulk, Dirichlet concentration of their proportions.
        accelerator, devices, train_size
            Lightning's accelerator and devices; each type's share of training cells.
        early_stopping
            Stop when ``validation_loss`` (cells, bulk and proportion terms) stops improving.
        strict_scale_check
            Raise, not warn, when the first-batch scale ratio is outside [0.1, 10].
        datasplitter_kwargs, plan_kwargs
            For :class:`~scvi.dataloaders.DataSplitter` and
            :class:`~hpvade.train.HPVADETrainingPlan` (``lr``: 3e-3, ...).
        **trainer_kwargs
            For :class:`~scvi.train.Trainer`, e.g. ``strategy="ddp"`` (``gradient_clip_val``:
            5.0; ``enable_progress_bar``: whether output goes to a terminal or notebook).
        """
        if self.reference_state_ is not None:  # undo an earlier adapt
            self.module.load_bulk_path_state(self.reference_state_)
        reset_fitted_state(self, "train")
        rng = np.random.default_rng(settings.seed)
        train_idx, val_idx = stratified_split(self.simulator.codes, train_size, rng)
        if max_epochs is None:
            max_epochs = max_epochs_heuristic(train_idx.size, batch_size)
        seed = int(rng.integers(2**31))
        self.pseudobulk_settings_ = {
            "cells_per_pseudobulk": int(cells_per_pseudobulk),
            "dirichlet_alpha": float(dirichlet_alpha),
        }
        simulator = self.simulator
        pool_train = simulator.pool(train_idx, n_pseudobulk, seed)
        n_val = max(n_pseudobulk // 5, 1)
        pool_val = simulator.pool(val_idx, n_val, seed + 1) if val_idx.size else None
        self.module.set_bulk_standardization(pool_train[0])
        datasplitter_kwargs = {
            "external_indexing": [train_idx, val_idx, np.array([], dtype=np.int64)],
            # BatchNorm needs 2 cells a batch: in each process, with DDP
            "drop_last": _cells_per_process(train_idx.size, devices, trainer_kwargs) % batch_size
            == 1,
            **(datasplitter_kwargs or {}),
        }
        plan_kwargs = {
            "pseudobulk_train": pool_train,
            "pseudobulk_validation": pool_val,
            "strict_scale_check": strict_scale_check,
            **(plan_kwargs or {}),
        }
        trainer_kwargs.setdefault("gradient_clip_val", 5.0)
        trainer_kwargs.setdefault("enable_progress_bar", interactive_output())
        if early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        if val_idx.size:
            # ten validations over a long run; a short one validates once, at its end
            every = max_epochs // 10 if max_epochs >= 10 else max_epochs
            trainer_kwargs.setdefault("check_val_every_n_epoch", max(1, every))
        with quiet_third_party():
            result = super().train(
                max_epochs,
                accelerator,
                devices,
                batch_size=batch_size,
                early_stopping=early_stopping,
                datasplitter_kwargs=datasplitter_kwargs,
                plan_kwargs=plan_kwargs,
                **trainer_kwargs,
            )
        self.scale_check_ = self.trainer.lightning_module.scale_check
        self.reference_state_ = self.module.bulk_path_state()
        with without_progress_bars(not trainer_kwargs["enable_progress_bar"]):
            self.calibrate_unexplained()
        return result

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs):
        """Load a saved model (folder ``dir_path`` written by :meth:`save`); with ``adata``,
        the training reference (same genes in order, no new type), first check it has the
        model's genes and labels. ``kwargs``: :meth:`scvi.model.base.BaseModelClass.load`'s."""
        with quiet_third_party():
            if adata is not None:
                registry = cls.load_registry(dir_path, prefix=kwargs.get("prefix"))
                check_matches_registry(adata, registry)
            return super().load(dir_path, adata=adata, **kwargs)

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        layer: str | None = None,
        counts_layer: str | None = None,
        **kwargs,
    ):
        """%(summary)s.

        Parameters
        ----------
        %(param_adata)s
        labels_key
            Column of ``adata.obs`` with cell-type labels.
        layer
            Layer with log1p-normalised expression; ``None`` uses ``adata.X``.
        counts_layer
            Optional layer with raw counts. When given, the VAE reconstructs counts and
            pseudobulks and S are built from counts.

        Notes
        -----
        Refused with an error that names the fix: a missing labels column, missing labels, empty
        categories, fewer than two types, duplicated names, negative or non-finite values,
        views, and data that is not log1p (integer values: keep counts in ``counts_layer`` and
        normalise ``X``; values above log1p range). Warned about: types with a single cell,
        genes that are zero in every cell, cells with zero counts.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if adata.is_view:
            raise ValueError(
                "setup_anndata registers fields on the AnnData, which a view cannot hold. Pass a "
                "copy: `ref = ref[mask].copy()`."
            )
        codes, categories = get_label_codes(adata, labels_key)
        gene_totals, cell_totals = validate_reference(adata, layer)
        check_counts_layer(adata, counts_layer)
        warn_on_sparse_types_genes_and_cells(adata, codes, categories, gene_totals, cell_totals)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if counts_layer is not None:
            anndata_fields.append(LayerField(COUNTS_KEY, counts_layer, is_count_data=True))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)


def _cells_per_process(n_cells: int, devices, trainer_kwargs: dict) -> int:
    """Training cells each process iterates over: all of them, or with DDP its share
    (scvi-tools' distributed sampler pads every process to ``ceil(n / processes)``)."""
    strategy = trainer_kwargs.get("strategy")
    if isinstance(strategy, str):
        distributed = "ddp" in strategy  # as scvi-tools decides on its distributed sampler
    else:
        distributed = any(c.__name__ == "DDPStrategy" for c in type(strategy).__mro__)
    if not distributed:
        return n_cells
    n_processes = len(devices) if isinstance(devices, list | tuple) else devices
    return math.ceil(n_cells / n_processes) if isinstance(n_processes, int) else n_cells
