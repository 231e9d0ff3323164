"""Learning the signature from a user's own bulk samples (no labels needed): the numerics.

Alternates two exact steps on the user's bulks: proportions given S (non-negative least
squares with each gene weighted by the inverse of its noise variance, estimated from the
residuals) and S given proportions (per-gene ridge regression towards the single-cell
signature, with a per-type strength that grows with the type's reference cells). A fixed,
small number of rounds is the early stop; held-out samples decide whether adapting helps at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from hpvade.core._estimator import DEFAULT_ROUNDS, ProportionEstimator
from hpvade.core._robust_kernel import weighted_nnls

logger = logging.getLogger(__name__)

#: Cohorts smaller than this get a proportionally weaker prior in ``adapt``.
SMALL_COHORT = 40
#: The settings of ``adapt`` that its numerics take (kept in ``adaptation_``).
ADAPT_OPTIONS = (
    "max_iterations",
    "prior_strength",
    "validation_fraction",
    "tolerance",
    "gene_factor",
    "factor_shrinkage",
)


@dataclass
class AdaptationResult:
    """What :func:`adapt_signature` did: iterations run, whether S was kept, held-out errors.

    ``gene_weights`` (None when S was left unchanged) are the per-gene inverse noise variances
    of the last round, used by the adapted model's proportion fits.
    """

    signature: np.ndarray
    gene_weights: np.ndarray | None
    kept: bool
    n_iterations_run: int
    validation_error: list[float] = field(default_factory=list)
    n_fit_samples: int = 0
    n_validation_samples: int = 0

    def as_dict(self) -> dict:
        return {
            "kept": self.kept,
            "n_iterations_run": self.n_iterations_run,
            "validation_error": [float(v) for v in self.validation_error],
            "n_fit_samples": self.n_fit_samples,
            "n_validation_samples": self.n_validation_samples,
        }


#: Prior degrees of freedom of the per-gene noise variances (how strongly each gene's own
#: residual variance is pulled towards the trend over genes), as in limma's moderated variances.
NOISE_PRIOR_DF = 10.0


def gene_noise_weights(
    bulk: np.ndarray, fitted: np.ndarray, n_params: int, prior_df: float = NOISE_PRIOR_DF
) -> np.ndarray:
    """Inverse noise variance of each gene, from the residuals ``bulk - fitted``; mean 1.

    Each gene's residual variance (``n_params`` fitted per sample) is moderated towards a
    quadratic trend of log variance on log mean expression, fitted over all genes, with
    ``prior_df`` degrees of freedom (limma's empirical Bayes in small): a gene seen in a few
    samples is not trusted on its own residuals, a gene's own evidence wins as samples grow.
    Bulk noise is far from uniform over genes (sample-specific biology scales with
    expression), and weighting the fit by it is what keeps a dozen noisy samples from
    pulling S astray.
    """
    df = max(bulk.shape[0] - n_params, 1)
    variance = ((bulk - fitted) ** 2).sum(axis=0) / df
    floor = max(float(variance.mean()) * 1e-8, 1e-12)
    variance = np.maximum(variance, floor)
    log_mean = np.log(np.maximum(fitted.mean(axis=0), 0.0) + 1e-2)
    design = np.stack([np.ones_like(log_mean), log_mean, log_mean**2], axis=1)
    coef = np.linalg.lstsq(design, np.log(variance), rcond=None)[0]
    trend = np.exp(design @ coef)
    moderated = (df * variance + prior_df * trend) / (df + prior_df)
    weights = 1.0 / moderated
    return weights / weights.mean()


def ridge_signature(
    bulk: np.ndarray,
    proportions: np.ndarray,
    prior: np.ndarray,
    strength: np.ndarray,
    gene_factor: np.ndarray,
) -> np.ndarray:
    """Cell-type profiles given proportions: per-gene ridge towards ``prior``, then clipped at 0.

    The ridge solution is unconstrained; negative entries are set to zero afterwards (not a
    non-negativity-constrained fit).

    For each gene g solves ``min_s ||b_g - f_g P s||^2 + sum_t strength_t (s_t - prior_gt)^2``
    (``f`` the gene's platform factor); one batched 'types × types' solve for all genes.
    """
    gram = proportions.T @ proportions
    systems = gene_factor[:, None, None] ** 2 * gram[None] + np.diag(strength)[None]
    rhs = gene_factor[:, None] * (bulk.T @ proportions) + strength[None, :] * prior
    return np.clip(np.linalg.solve(systems, rhs[..., None])[..., 0], 0.0, None)


def platform_factor(
    bulk: np.ndarray, proportions: np.ndarray, profiles: np.ndarray, shrinkage: float = 0.0
):
    """Per-gene factor f_g = argmin ||b_g - f_g P s_g||^2 + shrinkage-weighted (f_g - 1)^2.

    A protocol's gene-wise bias; ``shrinkage`` is in samples' worth of evidence for f = 1.
    """
    predicted = proportions @ profiles.T
    prior_weight = shrinkage * (predicted**2).mean(axis=0)
    numerator = (bulk * predicted).sum(axis=0) + prior_weight
    denominator = (predicted**2).sum(axis=0) + prior_weight
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1e-30), 1.0)


def adapt_signature(
    bulk_cpm: np.ndarray,
    prior: np.ndarray,
    initial_proportions: np.ndarray,
    strength: np.ndarray,
    max_iterations: int,
    validation_fraction: float,
    rng: np.random.Generator,
    gene_factor: bool = True,
    factor_shrinkage: float = 0.0,
    tolerance: float = 1e-6,
) -> AdaptationResult:
    """Alternate weighted P-steps and ridge S-steps, at most ``max_iterations`` times (fewer
    once S is stable).

    The gene weights (:func:`gene_noise_weights`) are re-estimated from every round's
    residuals. Over-fitting is held back by the prior (ridge towards the single-cell
    signature) and by the iteration count, a measured early stop (more iterations over-fit a
    dozen samples). Held-out samples are a guard: if the adapted S explains them worse than the
    unadapted one (weighted squared error, same weights), S is left unchanged.
    """
    n = bulk_cpm.shape[0]
    n_types = prior.shape[1]
    n_val = int(round(validation_fraction * n)) if n >= 6 else 0
    n_val = min(max(n_val, 2 if n >= 6 else 0), n - 4) if n_val else 0
    order = rng.permutation(n)
    val, fit = np.sort(order[:n_val]), np.sort(order[n_val:])

    S = prior.copy()
    profiles, factor = prior.copy(), np.ones(prior.shape[0])
    P = np.asarray(initial_proportions, dtype=float)
    weights = gene_noise_weights(bulk_cpm, P @ S.T, n_types)
    iterations = 0
    for k in range(1, max_iterations + 1):
        iterations = k
        previous = S
        P = weighted_nnls(bulk_cpm, S, weights, initial=P)
        if gene_factor:
            factor = platform_factor(bulk_cpm[fit], P[fit], profiles, factor_shrinkage)
        profiles = ridge_signature(bulk_cpm[fit], P[fit], prior, strength, factor)
        S = factor[:, None] * profiles
        weights = gene_noise_weights(bulk_cpm, P @ S.T, n_types)
        change = np.abs(S - previous).sum() / max(np.abs(previous).sum(), 1e-30)
        logger.debug("adapt iteration %d: relative change of S %.3g", k, change)
        if change < tolerance:
            break

    def held_out_error(signature: np.ndarray) -> float:
        bulk = bulk_cpm[val]
        fitted = weighted_nnls(bulk, signature, weights, initial=P[val]) @ signature.T
        return float((((bulk - fitted) ** 2) * weights).mean())

    errors = [held_out_error(prior), held_out_error(S)] if n_val else [float("nan")] * 2
    if n_val and errors[1] > errors[0]:
        logger.warning(
            "Adaptation did not explain held-out samples better (%.4g > %.4g): S is unchanged.",
            errors[1],
            errors[0],
        )
        return AdaptationResult(prior.copy(), None, False, iterations, errors, fit.size, n_val)
    return AdaptationResult(S, weights, True, iterations, errors, fit.size, n_val)


def adapt_to_cohort(
    cpm: np.ndarray,
    prior: ProportionEstimator,
    network_proportions: np.ndarray,
    type_cell_counts: np.ndarray,
    rng: np.random.Generator,
    options: dict,
) -> AdaptationResult:
    """``adapt`` on one cohort: :func:`adapt_signature` from ``prior`` (the reference's
    estimator), its prior strength scaled by each type's reference cells and by the cohort's
    size, started from the prior's robust fit (``options``: adapt's settings)."""
    # "n_rounds": the old name of max_iterations, in the summaries of older saved models
    options = {name: options.get(name, options.get("n_rounds")) for name in ADAPT_OPTIONS}
    counts = np.asarray(type_cell_counts, dtype=float)
    cohort = min(1.0, cpm.shape[0] / SMALL_COHORT)
    strength = options.pop("prior_strength") * cohort * counts / counts.mean()
    initial = prior.fit(cpm, network_proportions, DEFAULT_ROUNDS).proportions
    return adapt_signature(cpm, prior.signature, initial, strength, rng=rng, **options)
