"""Calibration maths of the proportion intervals (split-conformal, one factor per type)."""

from __future__ import annotations

import numpy as np

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
