"""What a fit says about each sample beyond its proportions: scores on the Anscombe
(variance-stabilised) scale (also the training's bulk loss), the share of the sample the
reference's types cannot explain, and the proportions as fractions of cells, of RNA or of the
whole sample."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from hpvade._constants import CPM_SCALE
from hpvade.core._robust_kernel import TUKEY_CUTOFF, far_above_fit

#: Samples scored together without autograd: keeps the (samples × genes) intermediates in cache.
ROW_BATCH_SIZE = 256
#: Samples converted to float32 together by :func:`sample_scores` (a multiple of the above, so
#: the row batches and so the scores are those of one call on the whole bulk).
SCORE_CHUNK = 16 * ROW_BATCH_SIZE


def anscombe(x: torch.Tensor) -> torch.Tensor:
    """Variance-stabilising transform for count-like data: 2 sqrt(x + 3/8).

    Squared differences on this scale weigh a gene's error by about 1 / its level, so a few
    highly expressed genes cannot dominate; unlike log1p it keeps a finite slope at zero.
    """
    return 2.0 * torch.sqrt(x + 0.375)


@torch.no_grad()
def _anscombe_residual_score(
    bulk_cpm: torch.Tensor,
    proportions: torch.Tensor,
    signature: torch.Tensor,
    positive_only: bool,
) -> torch.Tensor:
    """Per-sample mean squared Anscombe residual ``anscombe(bulk) - anscombe(p @ S.T)``.

    Row batches and in-place operations: on 10,000 × 5,000 several times faster than the
    differentiable expression.
    """
    parts = []
    for start in range(0, bulk_cpm.shape[0], ROW_BATCH_SIZE):
        rows = slice(start, start + ROW_BATCH_SIZE)
        residual = bulk_cpm[rows].add(0.375).sqrt_()
        residual.sub_((proportions[rows] @ signature.T).add_(0.375).sqrt_())
        if positive_only:
            residual.clamp_min_(0)
        parts.append(residual.square_().mean(-1).mul_(4.0))
    return torch.cat(parts) if parts else bulk_cpm.new_zeros(0)


@torch.no_grad()
def sample_scores(score, bulk_cpm, proportions, signature) -> np.ndarray:
    """``score`` (:func:`bulk_reconstruction_error`, :func:`unexplained_expression`) of numpy
    or torch inputs, as a float64 array (one value a sample). Converted to float32 a chunk of
    ``SCORE_CHUNK`` samples at a time, so no float32 copy of the whole bulk is held."""
    as_tensor = functools.partial(torch.as_tensor, dtype=torch.float32)
    signature = as_tensor(signature).cpu()
    parts = []
    for start in range(0, len(bulk_cpm), SCORE_CHUNK):
        rows = slice(start, start + SCORE_CHUNK)
        values = score(as_tensor(bulk_cpm[rows]), as_tensor(proportions[rows]), signature)
        parts.append(values.double().numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def bulk_reconstruction_error(
    bulk_cpm: torch.Tensor, proportions: torch.Tensor, signature: torch.Tensor
) -> torch.Tensor:
    """Per-sample bulk loss: mean over genes of (anscombe(p @ S.T) - anscombe(bulk))^2.

    Differentiable when autograd is on (training); a faster in-place path otherwise.
    """
    if torch.is_grad_enabled():
        return ((anscombe(proportions @ signature.T) - anscombe(bulk_cpm)) ** 2).mean(-1)
    return _anscombe_residual_score(bulk_cpm, proportions, signature, positive_only=False)


def unexplained_expression(
    bulk_cpm: torch.Tensor, proportions: torch.Tensor, signature: torch.Tensor
) -> torch.Tensor:
    """Per-sample mean over genes of the squared *positive* Anscombe residual.

    Expression the reconstruction ``p @ S.T`` falls short of: a cell type missing from the
    reference leaves its marker genes above any mixture of the known types, while noise
    scatters residuals both ways, so it separates samples lacking a type from complete ones
    better than the two-sided fit score.
    """
    return _anscombe_residual_score(bulk_cpm, proportions, signature, positive_only=True)


# ---------------------------------------------------------------- the unknown share
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
    express genes the known types explain (docs page "Real bulk data"). One minus the
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
    score: np.ndarray, measured: np.ndarray, stacklevel: int = 2
) -> tuple[np.ndarray, UnknownShareMap | None]:
    """Each sample's share of cells the reference lacks: the ``measured`` one, and for the
    samples where it is NaN the share the score's map reads (:func:`fit_unknown_share_map`,
    fitted on the measured samples), where that map does better than the cohort mean.
    Where it does not, those samples stay NaN, with a warning (``stacklevel``: its line).

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
            stacklevel=stacklevel,
        )
    return share, fitted


# ------------------------------------------------------------ fractions of what
def rna_to_cell_fractions(rna: np.ndarray, content: np.ndarray) -> np.ndarray:
    """RNA fractions (samples × types) to cell fractions: divide by each type's RNA content
    (mean counts per cell), renormalise."""
    cells = rna / np.maximum(np.asarray(content, dtype=float), 1e-12)
    return cells / cells.sum(axis=1, keepdims=True)


def with_unknown_content(
    rna: np.ndarray, unknown_rna: np.ndarray, content: np.ndarray
) -> np.ndarray:
    """The cell share of content of unknown type, from its RNA share, counting its cells with
    the known types' mean RNA content (``rna``: known types' RNA fractions, rows sum to 1)."""
    known_cells = (rna * (1.0 - unknown_rna)[:, None] / content).sum(axis=1)
    unknown_cells = unknown_rna / float(np.mean(content))
    total = known_cells + unknown_cells
    return np.divide(unknown_cells, total, out=np.zeros_like(total), where=total > 0)


def fractions_of_kind(
    mixture: np.ndarray, kind: str, content: np.ndarray | None, unknown_rna: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mixture (RNA) fractions as fractions of ``kind`` (cells where the RNA ``content`` is
    known), and the unknown share of each sample in the same units, from its RNA share."""
    unknown = np.clip(unknown_rna, 0.0, 1.0)
    if kind == "rna" or content is None:
        return mixture, unknown
    return rna_to_cell_fractions(mixture, content), with_unknown_content(mixture, unknown, content)
