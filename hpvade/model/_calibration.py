"""Calibrations of what ``get_proportions`` serves: the unexplained-sample flag (at the end of
``train`` and ``adapt``) and the 90 % intervals (on first use: most calls never ask for
them, and their calibration costs more than a short training)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from hpvade._compat import renamed_keywords
from hpvade._logging import progress
from hpvade._random import default_rng
from hpvade.core import ProportionEstimator, adapt_to_cohort, flag_threshold, interval_scale

logger = logging.getLogger(__name__)

#: Calibration of the unexplained-sample flag: pseudobulks per split and the score quantile.
UNEXPLAINED_CALIBRATION_PSEUDOBULKS = 500
UNEXPLAINED_QUANTILE = 0.995
#: Calibration of the intervals: pseudobulks per split, signature draws, target coverage.
INTERVAL_CALIBRATION_PSEUDOBULKS = 250
INTERVAL_CALIBRATION_DRAWS = 20
INTERVAL_COVERAGE = 0.9
#: Pseudobulks, over all splits, that calibrate an adapted model (each split runs adapt).
ADAPTED_CALIBRATION_PSEUDOBULKS = 400
#: Reference cells per type decoded for signature draws (a random subset above this).
MAX_CELLS_PER_TYPE_FOR_DRAWS = 200


class CalibrationMixin:
    """Calibrated uncertainty: signature draws from the VAE posterior, the flag threshold."""

    def _calibration_fits(
        self, n_pseudobulk: int, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """Half-split pseudobulks fitted the way the model serves proportions.

        Yields ``(signature, cpm, truth, estimate, gene_weights)``. Unadapted: the half
        signature and the refined network output. Adapted: the half signature is adapted to
        the pseudobulks (cohorts of the adapted cohort's size) as :meth:`adapt` did, and the
        estimate is its weighted fit.
        """
        self.module.eval()
        fit_genes = self.estimator().fit_genes
        adapted = self.gene_weights_ is not None
        if adapted:
            # cohorts of the adapted cohort's size (adapt's prior depends on it), 2-4 of them
            cohort = int(np.clip(self.adaptation_["n_samples"], 20, n_pseudobulk))
            n_splits = int(np.clip(np.ceil(ADAPTED_CALIBRATION_PSEUDOBULKS / cohort), 2, 4))
            splits = self.simulator.half_splits(cohort, rng, n_splits)
        else:
            n_splits = 2
            splits = self.simulator.half_splits(n_pseudobulk, rng, n_splits)
        for signature, cpm, truth in progress(splits, "Calibrating", total=n_splits):
            initial = self.module.predict_proportions(cpm)
            half = ProportionEstimator(signature, fit_genes)
            if not adapted:
                yield signature, cpm, truth, half.fit(cpm, initial).proportions, None
                continue
            counts = self.type_cell_counts_
            result = adapt_to_cohort(cpm, half, initial, counts, rng, self.adaptation_)
            weights = result.gene_weights  # None where the held-out guard kept the half S
            adapted_half = ProportionEstimator(result.signature, fit_genes, weights)
            estimate = adapted_half.fit(cpm, initial).proportions
            yield result.signature, cpm, truth, estimate, weights

    @renamed_keywords(n_samples="n_pseudobulk")
    def calibrate_unexplained(
        self,
        n_pseudobulk: int = UNEXPLAINED_CALIBRATION_PSEUDOBULKS,
        quantile: float = UNEXPLAINED_QUANTILE,
        seed: int | None = None,
    ) -> float:
        """Calibrate the threshold of the unexplained-sample flag on the reference.

        Runs at the end of :meth:`train` and :meth:`adapt`. The reference cells are split in
        halves per type: a signature is built from one half, pseudobulks of known composition
        are simulated from the other, fitted as :meth:`get_proportions` would (after
        ``adapt``: with a signature adapted to them) and scored (unexplained expression).
        These are samples the reference does explain, seen through a signature that never saw
        their cells. Both halves hold half the cells, which about doubles the noise of the
        score compared with the full reference and new samples, so the threshold is half the
        ``quantile`` of these scores. Kept in ``unexplained_threshold_`` (saved with the
        model).

        Parameters
        ----------
        n_pseudobulk
            Pseudobulks per split.
        quantile
            Quantile of the calibration scores.
        seed
            Seed of the splits and the simulation; defaults to ``scvi.settings.seed``.

        Returns
        -------
        The threshold.
        """
        fits = self._calibration_fits(n_pseudobulk, default_rng(seed))
        return self._calibrate_unexplained_on(list(fits), quantile)

    def _calibrate_unexplained_on(self, fits, quantile: float) -> float:
        adapted = self.gene_weights_ is not None
        self.unexplained_threshold_ = flag_threshold(fits, quantile, adapted)
        logger.info("Unexplained-sample threshold: %.4g.", self.unexplained_threshold_)
        return self.unexplained_threshold_

    @renamed_keywords(n_samples="n_pseudobulk")
    def calibrate_uncertainty(
        self,
        n_draws: int = INTERVAL_CALIBRATION_DRAWS,
        n_pseudobulk: int = INTERVAL_CALIBRATION_PSEUDOBULKS,
        coverage: float = INTERVAL_COVERAGE,
        seed: int | None = None,
    ) -> np.ndarray:
        """Calibrate the width of the proportion intervals on pseudobulks of known composition.

        Runs on the first :meth:`get_proportions` call with ``n_draws > 0`` after :meth:`train`
        or :meth:`adapt` (call it yourself to pay the cost up front). The signature draws of
        :meth:`get_proportions` capture how much the type profiles vary under the VAE
        posterior, not every source of error, so their spread alone is far too narrow. As for
        the unexplained-sample flag, a signature from half the reference cells of each type
        deconvolves pseudobulks simulated from the other half, fitted as
        :meth:`get_proportions` would, with the same draws around it. For each type,
        ``interval_scale_`` is the ``coverage`` quantile of the absolute error divided by the
        draws' spread (split-conformal calibration, one factor per type).

        Parameters
        ----------
        n_draws
            Signature draws per calibration sample.
        n_pseudobulk
            Pseudobulks per split.
        coverage
            Target coverage of the interval.
        seed
            Seed of the splits, the simulation and the draws; defaults to
            ``scvi.settings.seed``.

        Returns
        -------
        The per-type factors, also kept in ``interval_scale_`` (and saved with the model).
        """
        if self.adata is None:
            raise RuntimeError(
                "The intervals are not calibrated and the model has no reference to calibrate "
                "them on: load it with `hpvade.HPVADE.load(path, adata=ref)`, then ask for "
                "draws again."
            )
        rng = default_rng(seed)
        fits = list(self._calibration_fits(n_pseudobulk, rng))
        return self._calibrate_uncertainty_on(fits, n_draws, coverage, rng)

    def _calibrate_uncertainty_on(self, fits, n_draws, coverage, rng) -> np.ndarray:
        if self.signature_ratios_ is None or len(self.signature_ratios_) != n_draws:
            self.signature_ratios_ = self._signature_ratios(n_draws, rng).astype(np.float32)
        fit_genes = self.estimator().fit_genes
        self.interval_scale_ = interval_scale(fits, self.signature_ratios_, fit_genes, coverage)
        logger.info("Interval scales per type: %s.", np.round(self.interval_scale_, 3))
        return self.interval_scale_

    def signature_draws(self, n_draws: int, seed: int | None = None) -> np.ndarray:
        """Multiplicative perturbations of S under the VAE posterior (draws × genes × types):
        ``S * ratio`` (columns rescaled to CPM) is one plausible signature. What the
        intervals of :meth:`get_proportions` re-fit the proportions under.

        Parameters
        ----------
        n_draws
            Number of draws.
        seed
            Seed of the posterior samples and the bootstrap of cells; defaults to
            ``scvi.settings.seed``.

        Returns
        -------
        Array (draws × genes × cell types) of positive ratios, 1 on average over the draws
        (exactly 1 for genes the VAE does not model).
        """
        return self._signature_ratios(n_draws, default_rng(seed))

    @torch.no_grad()
    def _signature_ratios(self, n_draws: int, rng: np.random.Generator) -> np.ndarray:
        """Multiplicative perturbations of S (draws × genes × types) from the VAE posterior.

        Each draw decodes every (sub-sampled) reference cell from one sample of q(z | x),
        bootstraps the cells within each type, and aggregates the decoded profiles per type;
        the ratio of each draw's profiles to the mean over draws perturbs S. The encoder runs
        once; decoding and aggregation stay in float32 on the module's device.
        """
        simulator = self.simulator  # the reference's cells
        codes = simulator.codes
        n_types = self.summary_stats.n_labels
        members = simulator.cells_by_type(MAX_CELLS_PER_TYPE_FOR_DRAWS, rng)
        subset = np.concatenate(members)
        sub_codes = codes[subset]
        starts = np.concatenate([[0], np.cumsum([m.size for m in members])[:-1]])
        device = self.module.device
        # each cell's share of its type's aggregate: its total linear expression
        totals = simulator.cell_totals()[subset]
        weights = torch.as_tensor(totals, dtype=torch.float32, device=device)
        self.module.eval()
        loader = self._make_data_loader(adata=self.adata, indices=subset, batch_size=1024)
        posteriors = []
        for tensors in loader:
            inference = self.module.inference(**self.module._get_inference_input(tensors))
            posteriors.append((inference["qz"], inference["library"]))
        profiles = []
        for _ in progress(range(n_draws), "Drawing signatures"):
            decoded = torch.cat(
                [self.module.generative(qz.sample(), lib)["px_scale"] for qz, lib in posteriors]
            )
            decoded.mul_(weights[:, None])
            # bootstrap within each type: resample each type's cells with replacement
            picks = np.concatenate(
                [
                    start + rng.integers(0, m.size, m.size)
                    for start, m in zip(starts, members, strict=True)
                ]
            )
            aggregate = torch.zeros(n_types, decoded.shape[1], device=device)
            index = torch.as_tensor(sub_codes[picks], device=device)
            aggregate.index_add_(0, index, decoded[torch.as_tensor(picks, device=device)])
            profiles.append((aggregate / aggregate.sum(1, keepdim=True)).double().cpu().numpy())
        profiles = np.stack(profiles)  # draws × types × the VAE's genes
        ratios = profiles / np.maximum(profiles.mean(axis=0, keepdims=True), 1e-30)
        genes = self.module.vae_gene_index
        if genes is None:
            return ratios.transpose(0, 2, 1)
        # genes the VAE does not model keep their reference value in every draw
        full = np.ones((n_draws, len(self.var_names), n_types), dtype=ratios.dtype)
        full[:, genes.cpu().numpy()] = ratios.transpose(0, 2, 1)
        return full
