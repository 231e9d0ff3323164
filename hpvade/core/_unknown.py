"""The share of each bulk sample that the reference's cell types cannot explain: the genes a
cohort's fits fall far short of together (``obs["hpvade_unknown_fraction"]``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from hpvade._constants import CPM_SCALE
from hpvade.core._robust_kernel import far_above_fit
from hpvade.core._solvers import TUKEY_CUTOFF

#: The unknown fraction counts the genes the fit falls far short of in at least this share of
#: the samples deconvolved together (one sample: its own such genes).
UNEXPLAINED_COHORT_SHARE = 0.5
#: ... of which those whose excess over the fit follows the others' (Spearman above this over
#: the samples) count, in a cohort of at least ``UNEXPLAINED_MIN_COHORT`` samples.
UNEXPLAINED_MIN_CORRELATION = 0.3
UNEXPLAINED_MIN_COHORT = 10
#: Samples per chunk of the unknown fraction's log ratios (memory, not results).
UNEXPLAINED_CHUNK = 1024


def unknown_share(
    bulk: np.ndarray,
    coefficients: np.ndarray,
    signature: np.ndarray,
    cutoff: float = TUKEY_CUTOFF,
    cohort_share: float = UNEXPLAINED_COHORT_SHARE,
    min_correlation: float = UNEXPLAINED_MIN_CORRELATION,
) -> np.ndarray:
    """Per sample, the share of its expression (CPM / 1e6) that the fit falls short of in the
    genes the reference cannot explain, a lower bound on the share of cells it lacks (they also
    express genes the known types explain) that ranks samples by it.

    Those genes are the cohort's: genes whose log ratio ``log2((b + 1) / (fitted + 1))``
    exceeds their sample's median ratio by more than ``cutoff`` robust standard deviations
    (MAD) in at least ``cohort_share`` of the samples, counted in every sample by how much the
    bulk exceeds the fit there. With at least ``UNEXPLAINED_MIN_COHORT`` samples, only the
    genes whose excess rises and falls with the others' (Spearman > ``min_correlation`` with
    the samples' median relative excess) count: cells the reference lacks raise all their genes
    together, while a steady gene-wise error (a protocol effect, a marker the learned S gets
    wrong by a constant factor) does not follow them. A single sample counts its own genes.

    It ranks samples by a missing type's share but reads far below it: the missing cells also
    express genes the known types explain (``benchmarks/results/unknown.md``). One minus the
    fit's coefficient sum (EPIC's and Rectangle's reading) fails where a similar known type
    absorbs the missing one.

    The fit is ``coefficients @ signature.T`` (samples × types, genes × types), formed a chunk
    of samples at a time: a cohort-sized samples × genes array is never held.
    """
    short = np.empty(bulk.shape, dtype=bool)
    # the log ratios are per-sample statistics: in chunks of samples, to bound the memory
    for start in range(0, bulk.shape[0], UNEXPLAINED_CHUNK):
        rows = slice(start, start + UNEXPLAINED_CHUNK)
        fitted = coefficients[rows] @ signature.T
        far_above_fit(np.ascontiguousarray(bulk[rows], dtype=float), fitted, cutoff, short[rows])
    genes = np.flatnonzero(short.mean(axis=0) >= cohort_share)
    excess = np.clip(bulk[:, genes] - coefficients @ signature[genes].T, 0.0, None)
    if excess.shape[0] >= UNEXPLAINED_MIN_COHORT and genes.size > 2:
        excess = excess[:, _follows_the_others(excess) > min_correlation]
    return excess.sum(axis=1) / CPM_SCALE


def _follows_the_others(excess: np.ndarray) -> np.ndarray:
    """Per gene (column), the Spearman correlation over samples of its excess with the
    samples' median excess relative to each gene's mean. Ranks and one product rather than
    ``scipy.stats.spearmanr``, which would build the (genes + 1)² correlation matrix."""
    scale = excess.mean(axis=0)
    typical = np.median(excess / np.where(scale > 0, scale, 1.0), axis=1)
    gene_ranks = rankdata(excess, axis=0)
    gene_ranks -= gene_ranks.mean(axis=0)
    sample_ranks = rankdata(typical)
    sample_ranks -= sample_ranks.mean()
    norm = np.sqrt((gene_ranks**2).sum(axis=0) * (sample_ranks**2).sum())
    return np.divide(
        sample_ranks @ gene_ranks, norm, out=np.zeros(excess.shape[1]), where=norm > 0
    )


#: Fewest samples with a measured unknown share for the map from the score to be fitted.
MIN_MEASURED_SAMPLES = 5


@dataclass(frozen=True)
class UnknownShareMap:
    """The line from the unknown-content score to the measured unknown share, fitted on the
    samples where it was measured, and its leave-one-out error beside the cohort mean's.

    Attributes
    ----------
    n_measured
        Samples the map was fitted on.
    intercept, slope
        ``share ≈ intercept + slope × score`` (least squares).
    loo_error
        Mean absolute leave-one-out error of the map on the measured samples.
    loo_error_mean
        The same for the cohort-mean baseline: each sample predicted by the others' mean.
    served
        Whether the map is used for the unmeasured samples: only when it does better than the
        cohort mean.
    """

    n_measured: int
    intercept: float
    slope: float
    loo_error: float
    loo_error_mean: float
    served: bool

    def predict(self, score: np.ndarray) -> np.ndarray:
        """The share the map reads from ``score``, clipped to [0, 1]."""
        return np.clip(self.intercept + self.slope * np.asarray(score, float), 0.0, 1.0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def fit_unknown_share_map(score: np.ndarray, measured: np.ndarray) -> UnknownShareMap:
    """Fit :class:`UnknownShareMap` on the samples where ``measured`` is finite.

    The leave-one-out errors are exact for least squares: the residual of sample i left out
    is ``e_i / (1 - h_i)``, ``h_i`` its leverage.
    """
    keep = np.isfinite(measured) & np.isfinite(score)
    x, y = np.asarray(score, float)[keep], np.asarray(measured, float)[keep]
    n = x.size
    if n < MIN_MEASURED_SAMPLES:
        raise ValueError(
            f"A map from the unknown-content score to the unknown share needs at least "
            f"{MIN_MEASURED_SAMPLES} samples with a measured share; got {n}. Measure more "
            "samples, or pass a share for every sample."
        )
    design = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    gram_inv = np.linalg.pinv(design.T @ design)
    leverage = np.einsum("ij,jk,ik->i", design, gram_inv, design)
    residual = y - design @ coef
    loo = np.abs(residual / np.maximum(1.0 - leverage, 1e-12))
    loo_mean = np.abs(y - (y.sum() - y) / (n - 1))
    error, baseline = float(loo.mean()), float(loo_mean.mean())
    return UnknownShareMap(n, float(coef[0]), float(coef[1]), error, baseline, error < baseline)


def whole_sample_fractions(
    known: np.ndarray,
    unknown_cells: np.ndarray,
    kind: str,
    content: np.ndarray | None,
    unknown_content: float,
) -> np.ndarray:
    """Fractions of the whole sample (samples × (types + 1), the last column the unknown
    cells), from the known types' fractions and the share of the sample's cells that the
    reference lacks.

    Parameters
    ----------
    known
        The known types' fractions of the known part (cells for ``kind="cell"``, RNA for
        ``"rna"``); rows sum to 1.
    unknown_cells
        Each sample's share of cells the reference lacks (NaN: unknown; its row is NaN).
    kind
        ``"cell"``: cell fractions, ``known × (1 - u)`` and ``u``; exact, no RNA content
        needed. ``"rna"``: RNA fractions; the unknown cells' RNA share needs their RNA
        content: ``unknown_content`` times the known types' mean content.
    content
        The known types' RNA content (mean counts per cell), or None where the reference
        does not tell it (then every known type counts as the mean).
    unknown_content
        RNA per unknown cell relative to the mean of the known types' contents.
    """
    u = np.asarray(unknown_cells, dtype=float)
    if kind == "cell":
        return np.column_stack([known * (1.0 - u)[:, None], u])
    content = np.ones(known.shape[1]) if content is None else np.asarray(content, float)
    # RNA per known cell in each sample: the cells behind its RNA fractions, weighted
    known_cells = known / content
    per_known_cell = known.sum(axis=1) / known_cells.sum(axis=1)
    unknown_rna = u * unknown_content * content.mean()
    unknown_rna = unknown_rna / (unknown_rna + (1.0 - u) * per_known_cell)
    return np.column_stack([known * (1.0 - unknown_rna)[:, None], unknown_rna])


def unknown_cell_shares(
    score: np.ndarray, measured: np.ndarray
) -> tuple[np.ndarray, UnknownShareMap | None]:
    """Each sample's share of cells the reference lacks: the ``measured`` one, and for the
    samples where it is NaN the share the score's map reads (:func:`fit_unknown_share_map`,
    fitted on the measured samples), where that map does better than the cohort mean.
    Where it does not, those samples stay NaN, with a warning.

    Returns
    -------
    The shares, and the map (None where every sample was measured).
    """
    share = np.array(measured, dtype=float)
    unmeasured = np.isnan(share)
    if not unmeasured.any():
        return share, None
    fitted = fit_unknown_share_map(score, share)
    if fitted.served:
        share[unmeasured] = fitted.predict(np.asarray(score)[unmeasured])
    else:
        warnings.warn(
            "The unknown-content score does not predict the measured unknown share: "
            f"leave-one-out error {fitted.loo_error:.3f} against {fitted.loo_error_mean:.3f} "
            f"for the cohort mean, over {fitted.n_measured} measured samples. The "
            f"{int(unmeasured.sum())} unmeasured samples get no whole-sample fractions (NaN "
            "rows). Measure their share, or use the fractions of the known cells (without "
            "`unknown_share`).",
            UserWarning,
            # the user's line: past this function, the model's helper, get_proportions and
            # its keyword wrapper (a test checks)
            stacklevel=5,
        )
    return share, fitted
