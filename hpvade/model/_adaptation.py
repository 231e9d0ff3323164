"""``adapt``: learn S from the user's own bulk samples, starting from the reference model."""

from __future__ import annotations

import logging
import warnings
from typing import TypedDict

import numpy as np
import torch
from anndata import AnnData
from scvi import settings

from hpvade._compat import renamed_keywords
from hpvade._logging import progress
from hpvade._random import default_rng
from hpvade.core import ADAPT_OPTIONS, ProportionEstimator, adapt_to_cohort
from hpvade.data._bulk import as_bulk_anndata, prepare_bulk
from hpvade.model._fitted_state import reset_fitted_state

logger = logging.getLogger(__name__)

#: Fewest bulk samples ``adapt`` accepts (the network's BatchNorm needs 2; S needs variation).
MIN_ADAPT_SAMPLES = 3
#: Most alternations of ``adapt``: an early stop (see its ``max_iterations``).
DEFAULT_ADAPT_ITERATIONS = 30


class AdaptationSummary(TypedDict, total=False):
    """What :meth:`~hpvade.HPVADE.adapt` returns (and keeps in ``adaptation_``)."""

    kept: bool  # False: S unchanged
    declined: str  # why adapt did not run (only then)
    n_iterations_run: int
    validation_error: list[float]  # held-out error with the unadapted and the adapted S
    n_fit_samples: int
    n_validation_samples: int
    n_samples: int
    n_genes_adapted: int
    max_iterations: int
    prior_strength: float
    validation_fraction: float
    tolerance: float
    gene_factor: bool
    factor_shrinkage: float


class AdaptationMixin:
    """``adapt`` and the fine-tuning of the deconvolution network that follows it."""

    @renamed_keywords("0.3", "0.4", n_rounds="max_iterations")
    def adapt(
        self,
        bulk: AnnData,
        layer: str | None = None,
        max_iterations: int = DEFAULT_ADAPT_ITERATIONS,
        prior_strength: float = 0.5,
        validation_fraction: float = 0.2,
        tolerance: float = 1e-6,
        distill_steps: int = 300,
        gene_factor: bool = True,
        factor_shrinkage: float = 0.0,
        seed: int | None = None,
    ) -> AdaptationSummary:
        """Adapt S and the deconvolution network to your bulk samples (docs: "Adapting S to
        the user's bulks"); no labels needed. Every call starts from the model :meth:`train`
        left; if the adapted S explains held-out samples worse, S is left unchanged.

        Parameters
        ----------
        bulk
            A dozen or more samples of one protocol (linear scale, as for
            :meth:`get_proportions`), more than there are cell types.
        layer
            Layer with the values; ``None``: ``bulk.X``.
        max_iterations
            Most alternations of proportions and S (an early stop: a converged S over-fits
            small cohorts).
        prior_strength
            Pull towards the reference's S for a type with the mean number of cells, in
            samples' worth of evidence (scaled by ``n_samples / 40`` below 40 samples).
        validation_fraction, tolerance
            Share of samples held out (none below 6); stop once S moves less than this.
        distill_steps
            Steps fine-tuning the network on the adapted proportions.
        gene_factor, factor_shrinkage
            Fit a per-gene factor for a protocol's gene-wise bias; its pull towards 1.
        seed
            Seed of the held-out split; ``None``: ``scvi.settings.seed``.

        Returns
        -------
        :class:`AdaptationSummary` (also in ``adaptation_``): ``kept``, ``declined`` (why
        not, with a warning), ``validation_error`` (unadapted, adapted), counts, settings.
        """
        settings_given = dict(locals())  # adapt's numerical settings, kept in adaptation_
        self._check_if_trained(warn=False, message=self._not_trained_message)
        served = self.estimator()
        prepared = prepare_bulk(
            as_bulk_anndata(bulk),
            layer,
            self.var_names,
            served.signature,
            served.fit_genes,
            self.selected_genes_,
            stacklevel=settings.warnings_stacklevel + 2,  # the user's line
        )
        cpm, found = prepared.cpm, prepared.found
        if cpm.shape[0] < MIN_ADAPT_SAMPLES:
            raise ValueError(
                f"adapt needs at least {MIN_ADAPT_SAMPLES} bulk samples, got {cpm.shape[0]}: it "
                "learns S from what the samples share and fine-tunes the network on them, and "
                "a single sample has no variation to learn from. Use `get_proportions` without "
                "adapt, or adapt on a cohort (a dozen samples or more works best)."
            )
        if self.type_cell_counts_ is None:
            raise RuntimeError(
                "Adaptation needs the reference's cells per type: load the model with its "
                "reference, `HPVADE.load(path, adata=ref)`."
            )
        n_types = len(self.cell_types)
        if cpm.shape[0] <= n_types:
            return self._decline_adaptation(
                f"adapt needs more bulk samples than cell types to re-estimate S ({n_types} "
                f"types, {cpm.shape[0]} samples): each gene's profile is a regression on the "
                "samples' proportions, which fewer samples cannot identify. The model serves "
                "the reference-trained estimator; adapt on a larger cohort."
            )
        self._restore_reference_state()
        reset_fitted_state(self, "adapt")
        options = {name: settings_given[name] for name in ADAPT_OPTIONS}
        rng = default_rng(seed)
        self.module.eval()
        # S is re-estimated on the genes the bulk has; the others keep the reference's rows
        genes = np.flatnonzero(found)
        reference = self._adaptation_prior()
        prior = ProportionEstimator(reference[genes], self.estimator().fit_genes[genes])
        initial = self.module.predict_proportions(cpm)
        result = adapt_to_cohort(
            cpm[:, genes], prior, initial, self.type_cell_counts_, rng, options
        )
        summary = {**result.as_dict(), "n_samples": int(cpm.shape[0]), **options}
        summary["n_genes_adapted"] = int(genes.size)
        if result.kept:
            signature = reference.copy()
            signature[genes] = result.signature
            weights = np.zeros(len(self.var_names))  # genes not adapted: left out of the fit
            weights[genes] = result.gene_weights
            self.module.set_signature(signature)  # what the network is distilled with
            self.adapted_signature_ = np.asarray(signature, dtype=np.float64)
            self.gene_weights_ = weights
            self.adaptation_ = summary
            initial = self.module.predict_proportions(cpm)
            served = self.estimator().fit(cpm, initial, found=found)
            self._distill(cpm, served.proportions, distill_steps)
        self.calibrate_unexplained()
        logger.info(
            "Adapted S on %d bulk samples: %s after %d iterations (held-out error %.4g -> %.4g).",
            cpm.shape[0],
            "kept" if result.kept else "S unchanged",
            result.n_iterations_run,
            result.validation_error[0],
            result.validation_error[-1],
        )
        return summary

    def _adaptation_prior(self) -> np.ndarray:
        """The signature adapt starts from and is pulled towards: the one built from the
        reference cells (the learned S for a model saved before it was kept).

        Not the S learned on the single-cell path: adapting from a learned S was measured to
        be worse on the cross-dataset scenario of ``benchmarks/real.py``.
        """
        if self.reference_signature_ is not None:
            return np.asarray(self.reference_signature_, dtype=float)
        return self.module.signature_array()

    def _decline_adaptation(self, reason: str) -> AdaptationSummary:
        """Leave S as ``train`` left it, warn with ``reason`` and return adapt's summary."""
        if self.adaptation_ is not None:  # undo an earlier adapt, as every adapt does
            self._restore_reference_state()
            reset_fitted_state(self, "adapt")
            self.calibrate_unexplained()
        warnings.warn(reason, UserWarning, stacklevel=settings.warnings_stacklevel + 1)
        return {"kept": False, "declined": reason}

    def _restore_reference_state(self) -> None:
        """Put back S and the network as ``train`` left them (undoing an earlier ``adapt``)."""
        if self.reference_state_ is not None:
            self.module.load_bulk_path_state(self.reference_state_)

    def _distill(self, cpm: np.ndarray, proportions: np.ndarray, n_steps: int) -> None:
        """Fine-tune the deconvolution network to predict ``proportions`` from ``cpm``."""
        if n_steps <= 0:
            return
        module = self.module
        x = torch.as_tensor(cpm, dtype=torch.float32, device=module.device)
        y = torch.as_tensor(proportions, dtype=torch.float32, device=module.device)
        params = list(module.deconv_net.parameters()) + list(module.deconv_out.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-3)
        module.deconv_net.train()
        with torch.enable_grad():
            for _ in progress(range(n_steps), "Fine-tuning the network"):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(module.deconvolve(x), y)
                loss.backward()
                optimizer.step()
        module.eval()
