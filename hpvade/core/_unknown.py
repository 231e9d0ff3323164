"""The share of each bulk sample that the reference's cell types cannot explain: the genes a
cohort's fits fall far short of together (``obs["hpvade_unknown_fraction"]``)."""

from __future__ import annotations

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
