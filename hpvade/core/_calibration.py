"""The calibrator beside the estimator: from fits of pseudobulks of known composition, the
threshold of the unexplained-sample flag and the per-type scale of the proportion intervals
(split-conformal), and the interval maths that scale serves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpvade.core._diagnostics import sample_scores, unexplained_expression
from hpvade.core._estimator import DRAW_ROUNDS, ProportionEstimator

#: Floor of the spread, times sqrt(estimate + 0.01) (see :func:`spread`).
INTERVAL_FLOOR = 0.01


def spread(estimate: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The draws' standard deviation, with a small floor that grows with the estimate.

    The floor keeps types whose draws barely move (an estimate pinned at 0) from getting a
    zero-width interval.
    """
    return draws.std(axis=0) + INTERVAL_FLOOR * np.sqrt(estimate + 0.01)


def interval(
    estimate: np.ndarray, draws: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``estimate ± scale * spread``, clipped to [0, 1] (per-type ``scale``)."""
    half_width = np.asarray(scale)[None, :] * spread(estimate, draws)
    return np.clip(estimate - half_width, 0.0, 1.0), np.clip(estimate + half_width, 0.0, 1.0)


def conformal_scale(
    truths: list[np.ndarray],
    estimates: list[np.ndarray],
    draws: list[np.ndarray],
    coverage: float,
) -> np.ndarray:
    """Per-type ``coverage`` quantile of ``|truth - estimate| / spread`` (Mondrian conformal:
    error scales differ most between types)."""
    normalised = [
        np.abs(t - e) / spread(e, d) for t, e, d in zip(truths, estimates, draws, strict=True)
    ]
    return np.quantile(np.concatenate(normalised), coverage, axis=0)


def flag_threshold(fits: Sequence, quantile: float, adapted: bool) -> float:
    """The unexplained-sample flag's threshold: the ``quantile`` of the calibration fits'
    unexplained scores; unadapted, half of it (half-reference signatures about double the
    score's noise), adapted not (each half S is adapted to its pseudobulks, as the served S
    to the user's bulk).

    Parameters
    ----------
    fits
        ``(signature, cpm, truth, estimate, gene_weights)`` of each calibration split.
    quantile
        Quantile of the scores.
    adapted
        Whether the fits are an adapted model's.

    Returns
    -------
    The threshold.
    """
    scores = [
        sample_scores(unexplained_expression, cpm, estimate, signature)
        for signature, cpm, _, estimate, _ in fits
    ]
    factor = 1.0 if adapted else 0.5
    return factor * float(np.quantile(np.concatenate(scores), quantile))


def interval_scale(
    fits: Sequence, ratios: np.ndarray, fit_genes: np.ndarray, coverage: float
) -> np.ndarray:
    """Per-type factors of the intervals: each split's fit re-fitted under the signature
    draws ``ratios``, and the ``coverage`` quantile of the error over the draws' spread.

    Returns
    -------
    Array (types) of factors (:func:`conformal_scale`).
    """
    truths, estimates, draws = [], [], []
    for signature, cpm, truth, estimate, weights in fits:
        half = ProportionEstimator(signature, fit_genes, weights)
        draws.append(half.draws(cpm, estimate, ratios, DRAW_ROUNDS))
        truths.append(truth)
        estimates.append(estimate)
    return conformal_scale(truths, estimates, draws, coverage)
