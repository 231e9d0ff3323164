"""The HPVADE model (scvi-tools ``BaseModelClass``)."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.dataloaders import DataSplitter
from scvi.model._utils import get_max_epochs_heuristic, use_distributed_sampler
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp
from scvi.utils._docstrings import devices_dsp

from hpvade._constants import (
    COUNTS_KEY,
    FIT_SCORE_KEY,
    GENE_REPORT_KEY,
    PROPORTIONS_KEY,
    UNEXPLAINED_KEY,
    UNEXPLAINED_SCORE_KEY,
)
from hpvade.data._bulk import bulk_to_cpm, gene_report
from hpvade.data._labels import get_label_codes
from hpvade.data._pseudobulk import (
    cell_totals,
    cpm_rows,
    mix_cells,
    rna_fractions,
    sample_cell_counts,
)
from hpvade.data._signature import aggregate_by_type, cpm_columns, warn_if_flat
from hpvade.data._split import stratified_split
from hpvade.data._validation import (
    check_counts_layer,
    validate_reference,
    warn_on_sparse_types_genes_and_cells,
)
from hpvade.model._adaptation import adapt_signature, weighted_nnls
from hpvade.module import HPVADEModule
from hpvade.module._hpvade import bulk_reconstruction_error, unexplained_expression
from hpvade.train import HPVADETrainingPlan

logger = logging.getLogger(__name__)

_NOT_TRAINED = "The model is not trained yet: call `model.train()` first."

#: Adam steps refining the network's proportions. Measured on held-out PBMC pseudobulks
#: (default model): r 0.620 with none, 0.696 / 0.699 / 0.696 / 0.692 / 0.690 with 10 / 20 / 30 /
#: 50 / 200 steps: the optimum is reached early, and each step costs two (samples × genes)
#: products.
DEFAULT_REFINE_STEPS = 20

#: Cohorts smaller than this get a proportionally weaker prior in ``adapt``.
SMALL_COHORT = 40
#: Alternating rounds of ``adapt``: an early stop (see its ``n_rounds``).
DEFAULT_ADAPT_ROUNDS = 30

#: Calibration of the unexplained-sample flag: pseudobulks per fold and the score quantile.
UNEXPLAINED_CALIBRATION_SAMPLES = 500
UNEXPLAINED_QUANTILE = 0.995
#: Reference cells per type decoded for signature draws (a random subset above this).
MAX_CELLS_PER_TYPE_FOR_DRAWS = 500
#: Floor of the interval's spread, times sqrt(estimate + 0.01) (see ``HPVADE._spread``).
INTERVAL_FLOOR = 0.01


class HPVADE(BaseModelClass):
    """Hierarchical Prototype Variational Autoencoder for bulk deconvolution.

    A VAE over the reference cells and a deconvolution network over (pseudo)bulk samples share
    one learnable signature S (genes × types, CPM). The signature starts from the reference
    (:func:`hpvade.pp.build_signature`); a prototype loss ties each cell type's decoded cells to
    its column of S, and bulk samples are reconstructed as ``p @ S.T`` in CPM space.

    Parameters
    ----------
    adata
        Reference registered with :meth:`setup_anndata`.
    registry
        Saved registry, used by :meth:`load` when no AnnData is given.
    n_hidden
        Hidden units per layer.
    n_latent
        Dimensionality of the latent space.
    n_layers
        Hidden layers of the encoder and decoder.
    dropout_rate
        Dropout rate of the networks.
    **module_kwargs
        Passed to :class:`~hpvade.module.HPVADEModule` (loss weights, ``n_layers_deconv``, ...).

    Examples
    --------
    >>> hpvade.HPVADE.setup_anndata(ref, labels_key="cell_type")
    >>> model = hpvade.HPVADE(ref)
    >>> model.train()
    >>> props = model.get_proportions(bulk)
    """

    _module_cls = HPVADEModule
    _training_plan_cls = HPVADETrainingPlan
    _data_splitter_cls = DataSplitter
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 32,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        **module_kwargs,
    ):
        super().__init__(adata, registry)
        n_labels = self.summary_stats.n_labels
        signature = None
        if adata is not None:
            signature = cpm_columns(
                aggregate_by_type(adata, self._label_codes(), n_labels, *self._linear_source())
            )
            warn_if_flat(signature, stacklevel=settings.warnings_stacklevel)
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            signature=signature,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            use_counts=self._setup_args().get("counts_layer") is not None,
            **module_kwargs,
        )
        self.scale_check_: dict | None = None
        self.adaptation_: dict | None = None
        # Per-gene inverse noise variances learned by adapt(); None for an unadapted model.
        self.gene_weights_: np.ndarray | None = None
        self.type_cell_counts_ = (
            np.bincount(self._label_codes(), minlength=n_labels) if adata is not None else None
        )
        # Mean counts per cell of each type; None without a count layer (see get_proportions).
        self.rna_content_: np.ndarray | None = None
        if adata is not None and self._setup_args().get("counts_layer") is not None:
            totals = self._cell_totals()
            per_type = np.bincount(self._label_codes(), weights=totals, minlength=n_labels)
            self.rna_content_ = per_type / np.maximum(self.type_cell_counts_, 1)
        self.unexplained_threshold_: float | None = None
        self.interval_scale_: np.ndarray | None = None
        self._model_summary_string = (
            f"HPVADE model: {self.summary_stats.n_vars} genes, {n_labels} cell types, "
            f"n_latent {n_latent}, n_hidden {n_hidden}."
        )
        self.init_params_ = self._get_init_params(locals())

    # --------------------------------------------------------------------- registry helpers
    def _setup_args(self) -> dict:
        return self.registry_.get("setup_args", {})

    def _state(self, key: str) -> dict:
        return self.registry_["field_registries"][key]["state_registry"]

    @property
    def cell_types(self) -> pd.Index:
        """Cell-type names, in the order of the signature columns."""
        return pd.Index(np.asarray(self._state(REGISTRY_KEYS.LABELS_KEY)["categorical_mapping"]))

    @property
    def var_names(self) -> pd.Index:
        """Reference genes, in the order of the signature rows."""
        return pd.Index(np.asarray(self._state(REGISTRY_KEYS.X_KEY)["column_names"]))

    def _label_codes(self) -> np.ndarray:
        codes = self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY)
        return np.asarray(codes).ravel().astype(np.int64)

    def _linear_source(self) -> tuple[str | None, bool]:
        """(layer, is_log1p) of the data that is summed into S and into pseudobulks."""
        args = self._setup_args()
        if args.get("counts_layer") is not None:
            return args["counts_layer"], False
        return args.get("layer"), True

    def _simulate_mixtures(
        self,
        cells: np.ndarray,
        n_samples: int,
        cells_per_sample: int,
        alpha: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pseudobulk CPM from ``cells`` and their true mixture fractions.

        With a count layer, counts carry each cell's RNA content, so the mixture's shares are
        RNA fractions; otherwise they are the cell fractions.
        """
        codes, n_types = self._label_codes(), self.summary_stats.n_labels
        counts, fractions = sample_cell_counts(
            codes, n_types, n_samples, cells_per_sample, alpha, rng, cell_indices=cells
        )
        cpm = cpm_rows(mix_cells(self.adata, counts, *self._linear_source()), inplace=True)
        if self.rna_content_ is not None:
            fractions = rna_fractions(counts, codes, n_types, self._cell_totals())
        return cpm, fractions

    def _simulate_pool(
        self, cells: np.ndarray, n_samples: int, cells_per_sample: int, alpha: float, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cpm, fractions = self._simulate_mixtures(
            cells, n_samples, cells_per_sample, alpha, np.random.default_rng(seed)
        )
        return (
            torch.as_tensor(cpm, dtype=torch.float32),
            torch.as_tensor(fractions, dtype=torch.float32),
        )

    def _cell_totals(self) -> np.ndarray:
        if getattr(self, "_cell_totals_cache", None) is None:
            self._cell_totals_cache = cell_totals(self.adata, *self._linear_source())
        return self._cell_totals_cache

    # ----------------------------------------------------------------------------- getters
    def get_proportions(
        self,
        bulk: AnnData,
        layer: str | None = None,
        key_added: str = PROPORTIONS_KEY,
        batch_size: int | None = None,
        refine_steps: int = DEFAULT_REFINE_STEPS,
        kind: str = "cell",
        n_samples: int = 0,
    ) -> pd.DataFrame:
        """Estimate cell-type proportions of bulk samples, optionally with 90 % intervals.

        Parameters
        ----------
        bulk
            Bulk samples (samples × genes) on a linear scale (raw counts, CPM or TPM). Genes are
            matched by name; extra genes are ignored.
        layer
            Layer of ``bulk`` with the values; ``None`` uses ``bulk.X``.
        key_added
            Key of ``bulk.obsm`` where the proportions are written.
        batch_size
            Samples per forward pass; defaults to 1024.
        refine_steps
            Steps that refine the network's proportions on the bulk-reconstruction loss with
            the learned S (0 returns the network's output as is).
        kind
            ``"cell"`` (default): fractions of cells. ``"rna"``: fractions of the sample's RNA.
            A bulk mixes RNA, so the model estimates RNA fractions; with a registered count
            layer it knows each type's RNA content (mean counts per cell, ``rna_content_``) and
            cell fractions are ``(rna / content)`` renormalised. Without a count layer the
            reference is normalised per cell, RNA content is unknown, and both kinds return
            the same numbers.
        n_samples
            Signature draws for uncertainty (0: none). Each draw perturbs S by the variation of
            its type profiles under the VAE posterior (each reference cell decoded from a
            sample of q(z | x), cells bootstrapped within their type) and re-fits the
            proportions. The draws' standard deviation goes to ``obsm[key_added + "_std"]``;
            times a per-type factor ``interval_scale_`` calibrated on pseudobulks of known
            composition (see :meth:`calibrate_uncertainty`) it gives the 90 % interval
            ``obsm[key_added + "_lower"]`` / ``obsm[key_added + "_upper"]`` around the
            estimate. 20 draws are a good default.

        Returns
        -------
        DataFrame (samples × cell types); rows sum to 1. Also written to ``bulk.obsm[key_added]``.

        Notes
        -----
        Also written to ``bulk``:

        - ``obs["hpvade_fit_score"]``: mean over genes of the squared difference between
          ``anscombe(p @ S.T)`` and ``anscombe(bulk)`` (0 = perfectly explained).
        - ``obs["hpvade_unexplained_score"]``: the same with only the expression that
          ``p @ S.T`` falls short of (positive residuals), and ``obs["hpvade_unexplained"]``:
          whether it exceeds ``unexplained_threshold_``, calibrated on pseudobulks from the
          reference (see :meth:`calibrate_unexplained`). A warning names how many samples are
          flagged.
        - ``uns["hpvade_gene_report"]``: reference genes found, extra bulk genes ignored,
          reference genes that are zero in every sample.
        """
        self._check_if_trained(warn=False, message=_NOT_TRAINED)
        if kind not in ("cell", "rna"):
            raise ValueError(f'`kind` must be "cell" or "rna", got {kind!r}.')
        if bulk.is_view:
            raise ValueError(
                "`bulk` is a view of another AnnData; results are written to its obsm and obs. "
                "Pass a copy: `bulk = bulk[mask].copy()`."
            )
        cpm = bulk_to_cpm(bulk, self.var_names, layer)
        self._record_gene_report(bulk, cpm)
        mixture = self._deconvolve(cpm, batch_size, refine_steps)
        proportions = self._convert_kind(mixture, kind)
        result = pd.DataFrame(proportions, index=bulk.obs_names.copy(), columns=self.cell_types)
        bulk.obsm[key_added] = result
        bulk.obs[FIT_SCORE_KEY] = self._score_samples(bulk_reconstruction_error, cpm, mixture)
        self._flag_unexplained(bulk, cpm, mixture)
        if n_samples > 0:
            self._write_intervals(bulk, cpm, mixture, kind, key_added, n_samples, refine_steps)
        logger.info("Deconvolved %d samples (%s fractions).", bulk.n_obs, kind)
        return result

    @torch.no_grad()
    def _score_samples(self, score, cpm, proportions, signature=None) -> np.ndarray:
        """A per-sample score (``bulk_reconstruction_error``, ``unexplained_expression``)
        of ``proportions`` against ``signature`` (the model's S by default)."""
        if signature is None:
            signature = self.module.signature().detach().cpu()
        as_tensor = functools.partial(torch.as_tensor, dtype=torch.float32)
        return score(as_tensor(cpm), as_tensor(proportions), as_tensor(signature)).double().numpy()

    def _convert_kind(self, mixture: np.ndarray, kind: str) -> np.ndarray:
        """Mixture (RNA) fractions to cell fractions, where RNA content is known."""
        if kind == "rna" or self.rna_content_ is None:
            return mixture
        cells = mixture / np.maximum(np.asarray(self.rna_content_, dtype=float), 1e-12)
        return cells / cells.sum(axis=1, keepdims=True)

    def _record_gene_report(self, bulk: AnnData, cpm: np.ndarray) -> dict:
        report = gene_report(bulk, self.var_names, cpm)
        bulk.uns[GENE_REPORT_KEY] = report
        logger.info(
            "Genes: %d of %d reference genes found, %d extra bulk genes ignored, %d reference "
            "genes zero in every sample.",
            report["n_found"],
            report["n_reference_genes"],
            report["n_extra_ignored"],
            report["n_all_zero"],
        )
        return report

    def _flag_unexplained(self, bulk: AnnData, cpm: np.ndarray, mixture: np.ndarray) -> None:
        score = self._score_samples(unexplained_expression, cpm, mixture)
        bulk.obs[UNEXPLAINED_SCORE_KEY] = score
        if self.unexplained_threshold_ is None:
            if self.adata is None:
                logger.info("No reference loaded: the unexplained-sample flag is not calibrated.")
                return
            self.calibrate_unexplained()
        flagged = score > self.unexplained_threshold_
        bulk.obs[UNEXPLAINED_KEY] = flagged
        if flagged.any():
            warnings.warn(
                f"{int(flagged.sum())} of {flagged.size} bulk samples are not explained by the "
                f"reference (unexplained expression above {self.unexplained_threshold_:.3g}; "
                f'see bulk.obs["{UNEXPLAINED_KEY}"]). Likely causes: a cell type missing from '
                "the reference, a strong batch or platform effect between the reference and "
                "the bulk (try `model.adapt(bulk)`), or values on the wrong scale.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )

    # ---------------------------------------------------------------------------- uncertainty
    @torch.no_grad()
    def _signature_ratios(self, n_draws: int, rng: np.random.Generator) -> np.ndarray:
        """Multiplicative perturbations of S (draws × genes × types) from the VAE posterior.

        Each draw decodes every (sub-sampled) reference cell from one sample of q(z | x),
        bootstraps the cells within each type, and aggregates the decoded profiles per type;
        the ratio of each draw's profiles to the mean over draws perturbs S.
        """
        if self.adata is None:
            raise RuntimeError("Intervals need the reference: `HPVADE.load(path, adata=ref)`.")
        codes = self._label_codes()
        n_types = self.summary_stats.n_labels
        members = []
        for t in range(n_types):
            cells = np.flatnonzero(codes == t)
            if cells.size > MAX_CELLS_PER_TYPE_FOR_DRAWS:
                cells = np.sort(rng.choice(cells, MAX_CELLS_PER_TYPE_FOR_DRAWS, replace=False))
            members.append(cells)
        subset = np.concatenate(members)
        weights = self._cell_totals()[subset]  # each cell's share of its type's aggregate
        sub_codes = codes[subset]
        self.module.eval()
        loader = self._make_data_loader(adata=self.adata, indices=subset, batch_size=1024)
        profiles = []
        for _ in range(n_draws):
            decoded = []
            for tensors in loader:
                inference = self.module.inference(**self.module._get_inference_input(tensors))
                z = inference["qz"].sample()
                decoded.append(self.module.generative(z, inference["library"])["px_scale"])
            decoded = torch.cat(decoded).double().cpu().numpy() * weights[:, None]
            picks = np.concatenate(
                [
                    rng.choice(np.flatnonzero(sub_codes == t), (sub_codes == t).sum())
                    for t in range(n_types)
                ]
            )
            boot = sp.csr_matrix(
                (np.ones(picks.size), (sub_codes[picks], picks)), shape=(n_types, subset.size)
            )
            aggregate = np.asarray(boot @ decoded)
            profiles.append(aggregate / aggregate.sum(axis=1, keepdims=True))
        profiles = np.stack(profiles)  # draws × types × genes
        ratios = profiles / np.maximum(profiles.mean(axis=0, keepdims=True), 1e-30)
        return ratios.transpose(0, 2, 1)

    @staticmethod
    def _proportion_draws(
        cpm: np.ndarray,
        signature: np.ndarray,
        estimate: np.ndarray,
        ratios: np.ndarray,
        steps: int,
        gene_weights: np.ndarray | None = None,
    ) -> np.ndarray:
        """Proportions re-fitted under each perturbed signature (draws × samples × types);
        with ``gene_weights`` (an adapted model) by the weighted least squares of ``adapt``."""
        if gene_weights is None:
            cpm_t = torch.as_tensor(cpm, dtype=torch.float32)
            initial = torch.as_tensor(estimate, dtype=torch.float32)
        draws = []
        for ratio in ratios:
            perturbed = signature * ratio
            perturbed = perturbed / perturbed.sum(axis=0, keepdims=True) * 1e6
            if gene_weights is not None:
                draws.append(weighted_nnls(cpm, perturbed, gene_weights, estimate))
                continue
            perturbed_t = torch.as_tensor(perturbed, dtype=torch.float32)
            refined = HPVADEModule.refine_with_signature(cpm_t, perturbed_t, initial, steps)
            draws.append(refined.double().numpy())
        return np.stack(draws)

    @staticmethod
    def _spread(estimate: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """The draws' standard deviation, with a small floor that grows with the estimate.

        The floor keeps types whose draws barely move (an estimate pinned at 0) from getting
        a zero-width interval.
        """
        return draws.std(axis=0) + INTERVAL_FLOOR * np.sqrt(estimate + 0.01)

    @classmethod
    def _interval(cls, estimate: np.ndarray, draws: np.ndarray, scale: np.ndarray):
        half_width = np.asarray(scale)[None, :] * cls._spread(estimate, draws)
        return np.clip(estimate - half_width, 0.0, 1.0), np.clip(estimate + half_width, 0.0, 1.0)

    def _write_intervals(self, bulk, cpm, mixture, kind, key_added, n_samples, refine_steps):
        if self.interval_scale_ is None:
            self.calibrate_uncertainty()
        rng = np.random.default_rng(settings.seed or 0)
        signature = self.module.signature().detach().cpu().double().numpy()
        ratios = self._signature_ratios(n_samples, rng)
        weights = self._fit_weights(refine_steps)
        steps = max(refine_steps, 1)
        draws = self._proportion_draws(cpm, signature, mixture, ratios, steps, weights)
        draws = np.stack([self._convert_kind(d, kind) for d in draws])
        estimate = self._convert_kind(mixture, kind)
        lower, upper = self._interval(estimate, draws, self.interval_scale_)
        index, columns = bulk.obs_names.copy(), self.cell_types
        bulk.obsm[f"{key_added}_std"] = pd.DataFrame(draws.std(axis=0), index, columns)
        bulk.obsm[f"{key_added}_lower"] = pd.DataFrame(lower, index, columns)
        bulk.obsm[f"{key_added}_upper"] = pd.DataFrame(upper, index, columns)

    def calibrate_uncertainty(
        self, n_draws: int = 20, n_samples: int = 250, coverage: float = 0.9, seed: int = 0
    ) -> np.ndarray:
        """Calibrate the width of the proportion intervals on pseudobulks of known composition.

        The signature draws of :meth:`get_proportions` capture how much the type profiles
        vary under the VAE posterior, not every source of error, so their spread alone is far
        too narrow. As for the unexplained-sample flag, the reference cells are split in halves
        per type (twice): a signature from one half deconvolves pseudobulks simulated from the
        other, with the same draws around it. For each type, ``interval_scale_`` is the
        ``coverage`` quantile of the absolute error divided by the draws' spread
        (split-conformal calibration, one factor per type: error scales differ most between
        types).

        Parameters
        ----------
        n_draws
            Signature draws per calibration sample.
        n_samples
            Pseudobulks per split.
        coverage
            Target coverage of the interval.
        seed
            Seed of the splits, the simulation and the draws.

        Returns
        -------
        The per-type factors, also kept in ``interval_scale_`` (and saved with the model).
        """
        rng = np.random.default_rng(seed)
        ratios = self._signature_ratios(n_draws, rng)
        normalised = []
        for signature, cpm, truth, estimate in self._crossfit_pseudobulks(n_samples, rng):
            draws = self._proportion_draws(cpm, signature, estimate, ratios, DEFAULT_REFINE_STEPS)
            normalised.append(np.abs(truth - estimate) / self._spread(estimate, draws))
        # one factor per type (Mondrian conformal): error scales differ most between types
        self.interval_scale_ = np.quantile(np.concatenate(normalised), coverage, axis=0)
        logger.info("Interval scales per type: %s.", np.round(self.interval_scale_, 3))
        return self.interval_scale_

    def _crossfit_pseudobulks(self, n_samples: int, rng: np.random.Generator):
        """Twice: a signature from half the cells of each type, and pseudobulks from the rest.

        Yields ``(signature, cpm, truth, estimate)``: the half signature (genes × types),
        pseudobulk CPM, their true mixture fractions (RNA fractions with a count layer) and the
        proportions refined against the half signature. Samples the reference explains, seen
        through a signature that never saw their cells: the calibration data of the flag and
        of the intervals.
        """
        if self.adata is None:
            raise RuntimeError("Calibration needs the reference: `HPVADE.load(path, adata=ref)`.")
        codes = self._label_codes()
        n_types = self.summary_stats.n_labels
        source = self._linear_source()
        self.module.eval()
        for _ in range(2):
            half, other = stratified_split(codes, 0.5, rng)
            indicator = sp.csr_matrix(
                (np.ones(half.size), (codes[half], half)), shape=(n_types, codes.size)
            )
            signature = cpm_columns(mix_cells(self.adata, indicator, *source))
            cpm, truth = self._simulate_mixtures(other, n_samples, 500, 1.0, rng)
            cpm_t = torch.as_tensor(cpm, dtype=torch.float32)
            with torch.no_grad():
                initial = self.module.deconvolve(cpm_t.to(self.module.device)).cpu()
            signature_t = torch.as_tensor(signature, dtype=torch.float32)
            estimate = HPVADEModule.refine_with_signature(
                cpm_t, signature_t, initial, DEFAULT_REFINE_STEPS
            )
            yield signature, cpm, truth, estimate.double().numpy()

    def calibrate_unexplained(
        self,
        n_samples: int = UNEXPLAINED_CALIBRATION_SAMPLES,
        quantile: float = UNEXPLAINED_QUANTILE,
        seed: int = 0,
    ) -> float:
        """Calibrate the threshold of the unexplained-sample flag on the reference.

        Runs at the end of :meth:`train`. Twice, the reference cells are split in halves per
        type: a signature is built from one half and pseudobulks of known composition are
        simulated from the other, deconvolved with that signature and scored (unexplained
        expression). These are samples the
        reference does explain, seen through a signature that never saw their cells. Both
        halves hold half the cells, which about doubles the noise of the score compared with
        the full reference and new samples, so the threshold is half the ``quantile`` of
        these scores. The result is kept in ``unexplained_threshold_`` (and saved with the
        model).

        Parameters
        ----------
        n_samples
            Pseudobulks per split.
        quantile
            Quantile of the calibration scores.
        seed
            Seed of the splits and the simulation.

        Returns
        -------
        The threshold.
        """
        rng = np.random.default_rng(seed)
        scores = [
            self._score_samples(unexplained_expression, cpm, estimate, signature)
            for signature, cpm, _, estimate in self._crossfit_pseudobulks(n_samples, rng)
        ]
        self.unexplained_threshold_ = 0.5 * float(np.quantile(np.concatenate(scores), quantile))
        logger.info("Unexplained-sample threshold: %.4g.", self.unexplained_threshold_)
        return self.unexplained_threshold_

    def adapt(
        self,
        bulk: AnnData,
        layer: str | None = None,
        n_rounds: int = DEFAULT_ADAPT_ROUNDS,
        prior_strength: float = 1.0,
        validation_fraction: float = 0.2,
        tolerance: float = 1e-6,
        distill_steps: int = 300,
        gene_factor: bool = True,
        factor_shrinkage: float = 0.0,
        seed: int | None = None,
    ) -> dict:
        """Adapt the signature S and the deconvolution network to the user's bulk samples.

        No labels are needed. Rounds alternate proportions given S and S given proportions.
        Proportions are the exact non-negative least-squares fit of each sample with every gene
        weighted by the inverse of its noise variance, re-estimated each round from the
        residuals over all samples and moderated towards the trend over genes: bulk noise grows
        with expression and differs from gene to gene, and an unweighted fit lets the noisiest
        genes pull S astray. S is a per-gene ridge regression pulled towards the signature
        learned with the single-cell path (VAE and prototype loss), with a per-type strength
        proportional to the type's reference cells: a profile averaged over few cells may move
        freely, a well-sampled one stays anchored. A free per-gene factor absorbs a protocol's
        gene-wise bias. A share of the samples is held out: if the adapted S explains them
        worse than the unadapted one, S is left unchanged. The network is then fine-tuned to
        predict the adapted proportions, and :meth:`get_proportions` uses the adapted model:
        the adapted S and the same gene weights (``gene_weights_``).

        Parameters
        ----------
        bulk
            The user's bulk samples (linear scale), as for :meth:`get_proportions`.
        layer
            Layer of ``bulk`` with the values; ``None`` uses ``bulk.X``.
        n_rounds
            Alternating rounds; fewer stop earlier (rounds also end once S stops changing).
            The default, 30, is an early stop measured on held-out PBMC cohorts: converged
            S (300 rounds) over-fits a dozen samples (overall r 0.92 / 0.85 / 0.84 at 30
            rounds, 0.91 / 0.80 / 0.74 converged, three 12-sample cohorts) and gains little
            on 300 (0.960 → 0.965 under a platform shift).
        prior_strength
            Strength of the pull towards the single-cell signature for a type with the mean
            number of reference cells (in units of samples' worth of evidence). Below 40
            samples it is scaled by ``n_samples / 40``: measured on 12-sample PBMC cohorts
            (five draws), the full strength held the poorly sampled T-cell profiles back (mean
            r 0.69) where the scaled one let the bulks correct them (mean r 0.83).
        validation_fraction
            Share of samples held out to check that adapting helps (none below 6 samples).
        tolerance
            Stop once S changes by less than this (relative L1) between rounds.
        distill_steps
            Steps fine-tuning the deconvolution network on the adapted proportions.
        gene_factor
            Also fit a free per-gene factor shared by all types (a protocol's gene-wise bias
            between single-cell and bulk), so the prior does not fight a platform shift.
        factor_shrinkage
            Pull of that factor towards 1, in samples' worth of evidence.
        seed
            Seed of the held-out split; defaults to ``scvi.settings.seed``.

        Returns
        -------
        Summary dict (also in ``model.adaptation_``): ``kept_round`` (0 = S unchanged),
        ``n_rounds_run``, held-out ``validation_error`` (weighted squared error with the
        unadapted and the adapted S), sample counts.
        """
        self._check_if_trained(warn=False, message=_NOT_TRAINED)
        cpm = bulk_to_cpm(bulk, self.var_names, layer)
        self._record_gene_report(bulk, cpm)
        if self.type_cell_counts_ is None:
            raise RuntimeError(
                "Adaptation needs the reference's cells per type: load the model with its "
                "reference, `HPVADE.load(path, adata=ref)`."
            )
        counts = np.asarray(self.type_cell_counts_, dtype=float)
        cohort = min(1.0, cpm.shape[0] / SMALL_COHORT)
        strength = prior_strength * cohort * counts / counts.mean()
        rng = np.random.default_rng((settings.seed or 0) if seed is None else seed)
        self.module.eval()
        prior = self.module.signature().detach().cpu().double().numpy()
        initial = self._deconvolve(cpm, None, refine_steps=200)
        result = adapt_signature(
            cpm,
            prior,
            initial,
            strength,
            n_rounds=n_rounds,
            validation_fraction=validation_fraction,
            tolerance=tolerance,
            rng=rng,
            gene_factor=gene_factor,
            factor_shrinkage=factor_shrinkage,
        )
        if result.kept_round > 0:
            self.module.set_signature(result.signature)
            self.gene_weights_ = result.gene_weights
            self._distill(cpm, self._deconvolve(cpm, None, DEFAULT_REFINE_STEPS), distill_steps)
        self.adaptation_ = result.as_dict()
        logger.info(
            "Adapted S on %d bulk samples: kept round %d of %d (held-out error %.4g -> %.4g).",
            cpm.shape[0],
            result.kept_round,
            result.n_rounds_run,
            result.validation_error[0],
            result.validation_error[-1],
        )
        return self.adaptation_

    def _distill(self, cpm: np.ndarray, proportions: np.ndarray, n_steps: int) -> None:
        """Fine-tune the deconvolution network to predict ``proportions`` from ``cpm``."""
        if n_steps <= 0:
            return
        module = self.module
        device = module.device
        x = torch.as_tensor(cpm, dtype=torch.float32, device=device)
        y = torch.as_tensor(proportions, dtype=torch.float32, device=device)
        params = list(module.deconv_net.parameters()) + list(module.deconv_out.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-3)
        module.deconv_net.train()
        with torch.enable_grad():
            for _ in range(n_steps):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(module.deconvolve(x), y)
                loss.backward()
                optimizer.step()
        module.eval()

    def _fit_weights(self, refine_steps: int) -> np.ndarray | None:
        """Gene weights of the weighted fit, or None where proportions are refined instead
        (an unadapted model) or not fitted at all (``refine_steps=0``)."""
        if refine_steps <= 0 or self.gene_weights_ is None:
            return None
        return np.asarray(self.gene_weights_, dtype=float)

    def _deconvolve(
        self, cpm: np.ndarray, batch_size: int | None, refine_steps: int
    ) -> np.ndarray:
        """The network's proportions, then fitted to the bulk with the model's S.

        Unadapted: ``refine_steps`` Adam steps on the Anscombe-scale bulk loss. Adapted
        (``gene_weights_`` set): the exact gene-weighted least squares that :meth:`adapt`
        fitted S with. ``refine_steps=0`` returns the network's output as is.
        """
        batch_size = batch_size or 1024
        self.module.eval()
        device = self.module.device
        weights = self._fit_weights(refine_steps)
        if weights is not None:
            signature = self.module.signature().detach().cpu().double().numpy()
        parts = []
        for start in range(0, cpm.shape[0], batch_size):
            rows = np.asarray(cpm[start : start + batch_size], dtype=float)
            chunk = torch.as_tensor(rows, dtype=torch.float32, device=device)
            with torch.no_grad():
                proportions = self.module.deconvolve(chunk)
            if weights is not None:
                initial = proportions.double().cpu().numpy()
                parts.append(weighted_nnls(rows, signature, weights, initial))
                continue
            if refine_steps > 0:
                proportions = self.module.refine_proportions(chunk, proportions, refine_steps)
            parts.append(proportions.double().cpu().numpy())
        proportions = np.concatenate(parts)
        return proportions / proportions.sum(axis=1, keepdims=True)

    @torch.inference_mode()
    def get_signature(self) -> pd.DataFrame:
        """The learned signature S (genes × cell types, CPM; columns sum to 1e6)."""
        signature = self.module.signature().double().cpu().numpy()
        return pd.DataFrame(signature, index=self.var_names, columns=self.cell_types)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent representation of reference cells (cells × ``n_latent``).

        Parameters
        ----------
        adata
            AnnData set up like the reference; ``None`` uses the model's.
        indices
            Cells to use; ``None`` uses all.
        give_mean
            Return the posterior mean rather than a sample.
        batch_size
            Cells per minibatch; defaults to ``scvi.settings.batch_size``.
        """
        self._check_if_trained(warn=False, message=_NOT_TRAINED)
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        self.module.eval()
        latent = []
        for tensors in loader:
            outputs = self.module.inference(**self.module._get_inference_input(tensors))
            z = outputs["qz"].loc if give_mean else outputs["z"]
            latent.append(z.cpu())
        return torch.cat(latent).numpy()

    # ----------------------------------------------------------------------------- training
    @devices_dsp.dedent
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        n_pseudobulk: int = 4000,
        cells_per_pseudobulk: int = 500,
        pseudobulk_alpha: float = 1.0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        early_stopping: bool = False,
        strict_scale_check: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model on the registered reference.

        Reference cells are split (stratified by type) into training and validation cells; a
        pool of pseudobulks is simulated from each part, so validation never sees a training
        cell. Every cell minibatch is paired with a pseudobulk minibatch of the same size.

        Parameters
        ----------
        max_epochs
            Epochs over the training cells; ``None`` uses scvi-tools' heuristic
            (400 below 20,000 cells, fewer above).
        batch_size
            Cells (and pseudobulks) per minibatch.
        n_pseudobulk
            Size of the training pseudobulk pool; the validation pool is a fifth of it.
        cells_per_pseudobulk
            Cells summed into each pseudobulk.
        pseudobulk_alpha
            Dirichlet concentration of the simulated proportions.
        %(param_accelerator)s
        %(param_devices)s
        train_size
            Fraction of each type's cells used for training; the rest validates.
        early_stopping
            Stop on ``elbo_validation`` (scvi-tools' early stopping).
        strict_scale_check
            Raise instead of warning when the first-batch scale ratio is outside [0.1, 10].
        datasplitter_kwargs
            Passed to :class:`~scvi.dataloaders.DataSplitter`.
        plan_kwargs
            Passed to :class:`~hpvade.train.HPVADETrainingPlan` (``lr``, ...).
        **trainer_kwargs
            Passed to :class:`~scvi.train.Trainer` (Lightning), e.g. ``strategy="ddp"``.
            ``gradient_clip_val`` defaults to 5.0.
        """
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(self.adata.n_obs)
        codes = self._label_codes()
        rng = np.random.default_rng(settings.seed)
        train_idx, val_idx = stratified_split(codes, train_size, rng)
        seed = int(rng.integers(2**31))
        pool_train = self._simulate_pool(
            train_idx, n_pseudobulk, cells_per_pseudobulk, pseudobulk_alpha, seed
        )
        pool_val = None
        if val_idx.size:
            pool_val = self._simulate_pool(
                val_idx,
                max(n_pseudobulk // 5, 1),
                cells_per_pseudobulk,
                pseudobulk_alpha,
                seed + 1,
            )
        self.module.set_bulk_standardization(pool_train[0])

        datasplitter_kwargs = dict(datasplitter_kwargs or {})
        datasplitter_kwargs.setdefault(
            "drop_last",
            train_idx.size % batch_size == 1,  # BatchNorm needs 2 cells a batch
        )
        splitter = self._data_splitter_cls(
            self.adata_manager,
            external_indexing=[train_idx, val_idx, np.array([], dtype=np.int64)],
            batch_size=batch_size,
            distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy")),
            **datasplitter_kwargs,
        )
        plan = self._training_plan_cls(
            self.module,
            pseudobulk_train=pool_train,
            pseudobulk_validation=pool_val,
            strict_scale_check=strict_scale_check,
            **(plan_kwargs or {}),
        )
        trainer_kwargs.setdefault("gradient_clip_val", 5.0)
        if val_idx.size:
            trainer_kwargs.setdefault("check_val_every_n_epoch", max(1, max_epochs // 10))
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            **trainer_kwargs,
        )
        try:
            result = runner()
        finally:
            self.scale_check_ = plan.scale_check
        # Calibrate the unexplained-sample flag now, so get_proportions never pays for it.
        self.calibrate_unexplained()
        return result

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs):
        """Load a saved model; with ``adata``, first check it has the model's genes and labels.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            The reference the model was trained on (same genes in the same order, and no cell
            type the model does not know). ``None`` loads without data.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.
        """
        if adata is not None:
            registry = cls.load_registry(dir_path, prefix=kwargs.get("prefix"))
            _check_matches_registry(adata, registry)
        return super().load(dir_path, adata=adata, **kwargs)

    # -------------------------------------------------------------------------------- setup
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
        Refused with a ``ValueError`` that names the fix: a missing labels column (``KeyError``),
        missing labels, empty categories, fewer than two types, duplicated ``var_names`` or
        ``obs_names``, negative or non-finite values, and AnnData views. Warned about (training
        still works): integer-valued ``X`` (raw counts where log1p values are expected: the
        warning explains how to normalise and keep the counts in ``counts_layer``), ``X`` above
        log1p range (normalised but not log-transformed), cell types with a single cell, genes
        that are zero in every cell and cells with zero counts.
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


def _check_matches_registry(adata: AnnData, registry: dict) -> None:
    """Refuse an AnnData whose genes or labels differ from those a model was saved with."""
    fields = registry["field_registries"]
    genes = pd.Index(np.asarray(fields[REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]))
    if not adata.var_names.equals(genes):
        missing = genes.difference(adata.var_names)
        extra = adata.var_names.difference(genes)
        raise ValueError(
            f"The AnnData's genes differ from the saved model's ({len(genes)} genes): "
            f"{len(missing)} missing (e.g. {missing[:3].tolist()}), {len(extra)} extra "
            f"(e.g. {extra[:3].tolist()}){', or in another order' if not len(missing) else ''}. "
            "Load with the reference the model was trained on, or align it first: "
            "`adata = adata[:, model_genes].copy()`."
        )
    labels_key = registry["setup_args"]["labels_key"]
    known = set(
        np.asarray(fields[REGISTRY_KEYS.LABELS_KEY]["state_registry"]["categorical_mapping"])
    )
    if labels_key not in adata.obs:
        raise ValueError(
            f"The AnnData has no `obs[{labels_key!r}]`, the labels the model was trained with."
        )
    unknown = sorted(set(adata.obs[labels_key].astype(str).unique()) - known)
    if unknown:
        raise ValueError(
            f"`obs[{labels_key!r}]` holds cell types the saved model does not know: {unknown} "
            f"(model types: {sorted(known)}). Load with the reference the model was trained on."
        )
