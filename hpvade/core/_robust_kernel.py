"""Compiled per-sample statistics of the robust fit, one sample per thread: each
re-weighting round's gene weights and solve (``_estimator.robust_dampened_fit``), the genes
far above a sample's fit (``_diagnostics.unknown_share``), and exact non-negative least squares
over a shared Gram matrix (the robust fit's start; an adapted model's gene-weighted fit).

In numpy each round would be a dozen passes over a samples × genes array (log ratios, three
row medians, the biweight, the variance power's bins, the weights), each on one core, and the
solves would sweep every sample until the slowest converged; compiled, each sample is one
pass on one thread and stops on its own (``benchmarks/fit_speed.py`` times both). The Gram
matrices stay matrix products (BLAS is faster here than a per-sample loop fused into the
kernel), one block of samples per thread; ``log2(bulk + 1)`` is computed once per fit, not
every round. Every statistic is the one the numpy version computed, in the same order where it
matters (medians, bins); sums over genes may differ in the last bits.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

#: log(x) as log2(x) × ln 2: numba's natural log is several times slower than its log2 here
LN2 = math.log(2.0)
#: Tukey biweight cut-off on a gene's log ratio of bulk to fit, in robust standard deviations
#: (MAD): genes beyond it get weight 0 in that sample's next round.
TUKEY_CUTOFF = 3.0


@njit(cache=True)
def _kth_smallest(a, k):
    """The k-th smallest value of ``a`` (reordered in place): quickselect with a median-of-three
    pivot and branch-free partitions. numba's ``np.median`` partitions with branches that
    random data mispredicts."""
    lo, hi = 0, a.size
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi - 1]
        pivot = max(min(x, y), min(max(x, y), z))
        if pivot != pivot:  # NaN: no order to select in
            return pivot
        below = lo  # a[lo:below] < pivot
        for i in range(lo, hi):
            v = a[i]
            a[i] = a[below]
            a[below] = v
            below += v < pivot
        equal = below  # a[below:equal] == pivot
        for i in range(below, hi):
            v = a[i]
            a[i] = a[equal]
            a[equal] = v
            equal += v == pivot
        if k < below:
            hi = below
        elif k < equal:
            return pivot
        else:
            lo = equal
    return a[lo]


@njit(cache=True)
def median_in_place(a):
    """``np.median(a)`` (the mean of the two middle values of an even count), reordering ``a``."""
    half = a.size // 2
    upper = _kth_smallest(a, half)
    if a.size % 2:
        return upper
    lower = a[0]
    for t in range(1, half):  # after the selection a[:half] holds the smaller values
        lower = max(lower, a[t])
    return (lower + upper) / 2.0


@njit(cache=True)
def variance_power_row(bulk, fitted, log_fitted, kept, n_bins, low_power, high_power):
    """One sample's variance power (see ``hpvade.core._estimator.variance_power``)."""
    low, high, n_kept = np.inf, -np.inf, 0
    for g in range(bulk.size):
        if kept[g]:
            n_kept += 1
            low = min(low, log_fitted[g])
            high = max(high, log_fitted[g])
    if n_kept == 0:
        low = 0.0
    width = max(high - low, 1e-12) / n_bins
    counts = np.zeros(n_bins)
    centres = np.zeros(n_bins)
    spread = np.zeros(n_bins)
    for g in range(bulk.size):
        if kept[g]:
            position = (log_fitted[g] - low) / width
            b = min(max(int(position), 0), n_bins - 1)
            counts[b] += 1.0
            centres[b] += log_fitted[g]
            spread[b] += abs(bulk[g] - fitted[g])
    total = 0.0
    for b in range(n_bins):
        total += counts[b]
    total = max(total, 1.0)
    mean_x, mean_y = 0.0, 0.0
    levels = np.empty(n_bins)
    for b in range(n_bins):
        size = max(counts[b], 1.0)
        centres[b] /= size
        levels[b] = 2.0 * np.log(spread[b] / size + 1e-12)
        mean_x += counts[b] / total * centres[b]
        mean_y += counts[b] / total * levels[b]
    cross, square = 0.0, 0.0
    for b in range(n_bins):
        share = counts[b] / total
        dx = centres[b] - mean_x
        cross += share * dx * (levels[b] - mean_y)
        square += share * dx * dx
    return min(max(cross / max(square, 1e-300), low_power), high_power)


@njit(parallel=True, cache=True)
def variance_powers(bulk, fitted, log_fitted, kept, n_bins, low_power, high_power, out):
    """:func:`variance_power_row` of every row, one row per thread."""
    for i in prange(bulk.shape[0]):
        out[i] = variance_power_row(
            bulk[i], fitted[i], log_fitted[i], kept[i], n_bins, low_power, high_power
        )


@njit(cache=True)
def _solve_round(gram, linear, coef, max_sweeps, tolerance):
    """One sample's ``min_c c' G c / 2 - l' c`` with ``c >= 0`` by exact coordinate descent,
    warm-started at ``coef`` (in place): sweeps over the types until the largest step,
    relative to ``max |linear|``, is below ``tolerance``."""
    n_types = coef.size
    # gram @ coef - linear, and the largest |linear|, by loops: numba compiles array
    # expressions and its @ slowly, and every second of it is the user's first call
    gradient = np.empty(n_types)
    scale = 1e-300
    for s in range(n_types):
        gradient[s] = -linear[s]
        scale = max(scale, abs(linear[s]))
    for t in range(n_types):
        for s in range(n_types):
            gradient[s] += gram[t, s] * coef[t]
    for _ in range(max_sweeps):
        largest = 0.0
        for t in range(n_types):
            curvature = max(gram[t, t], 1e-300)
            new = max(coef[t] - gradient[t] / curvature, 0.0)
            step = new - coef[t]
            coef[t] = new
            for s in range(n_types):
                gradient[s] += step * gram[t, s]
            largest = max(largest, abs(step) * curvature)
        if largest / scale < tolerance:
            break


@njit(cache=True)
def _centred_log_ratios(b, fitted, ratio, scratch):
    """``ratio``: each gene's ``log2((b + 1) / (fitted + 1))`` minus the sample's median ratio;
    returns the sample's robust standard deviation of the ratios (1.4826 × MAD)."""
    for g in range(b.size):
        ratio[g] = math.log2(b[g] + 1.0) - math.log2(fitted[g] + 1.0)
    return _centre_and_spread(ratio, scratch)


@njit(cache=True)
def _centre_and_spread(ratio, scratch):
    """Centre ``ratio`` on its median in place; returns 1.4826 × its MAD."""
    for g in range(ratio.size):
        scratch[g] = ratio[g]
    centre = median_in_place(scratch)
    for g in range(ratio.size):
        ratio[g] -= centre
        scratch[g] = abs(ratio[g])
    return 1.4826 * median_in_place(scratch)


@njit(parallel=True, cache=True)
def far_above_fit(bulk, fitted, cutoff, out):
    """``out[i, g]``: gene g's log ratio of bulk to fit exceeds sample i's median ratio by more
    than ``cutoff`` robust standard deviations (one sample per thread)."""
    for i in prange(bulk.shape[0]):
        ratio, scratch = np.empty(bulk.shape[1]), np.empty(bulk.shape[1])
        spread = _centred_log_ratios(bulk[i], fitted[i], ratio, scratch)
        for g in range(bulk.shape[1]):
            out[i, g] = ratio[g] > cutoff * spread


@njit(parallel=True, cache=True)
def round_weights(
    bulk,
    log_bulk,
    fitted_block,
    rows,
    weight_cap,
    tukey_cutoff,
    estimate_power,
    n_bins,
    low_power,
    high_power,
    weights,
    block,
):
    """One round's gene weights of the samples ``rows`` (one per thread), from their fits
    ``fitted_block`` (in the order of ``rows``; overwritten): written to their rows of
    ``weights`` and, in order, to ``block``. ``log_bulk``: ``log2(bulk + 1)``, which every
    round shares."""
    n_genes = bulk.shape[1]
    for j in prange(rows.size):
        i = rows[j]
        b, fitted, w = bulk[i], fitted_block[j], block[j]
        floor = 0.0
        for g in range(n_genes):
            floor += b[g]
        floor *= 1e-3 / n_genes
        ratio, scratch = np.empty(n_genes), np.empty(n_genes)
        kept = np.empty(n_genes, dtype=np.bool_)
        log_b = log_bulk[i]
        for g in range(n_genes):
            ratio[g] = log_b[g] - math.log2(fitted[g] + 1.0)
        scale = tukey_cutoff * (_centre_and_spread(ratio, scratch) + 1e-9)
        for g in range(n_genes):
            u = ratio[g] / scale
            ratio[g] = max(1.0 - u * u, 0.0) ** 2  # Tukey's biweight, in place
            kept[g] = ratio[g] > 0.0
            fitted[g] = max(fitted[g], floor)
            w[g] = math.log2(fitted[g]) * LN2
        power = 2.0
        if estimate_power:
            power = variance_power_row(b, fitted, w, kept, n_bins, low_power, high_power)
        for g in range(n_genes):
            w[g] = math.exp(w[g] * -power)
            scratch[g] = w[g]
        cap = weight_cap * median_in_place(scratch)
        for g in range(n_genes):
            w[g] = min(w[g], cap) * ratio[g]
            weights[i, g] = w[g]


@njit(parallel=True, cache=True)
def gram_products(weights, outer, out, n_blocks):
    """``out = weights @ outer`` by ``n_blocks`` blocks of rows, one BLAS call per thread.
    Called with one BLAS thread: OpenBLAS's own threads spin after each product and slow
    the other kernels, while here the compiled threads share the work."""
    size = (weights.shape[0] + n_blocks - 1) // n_blocks
    for k in prange(n_blocks):
        start, stop = k * size, min(weights.shape[0], (k + 1) * size)
        if start < stop:
            np.dot(weights[start:stop], outer, out[start:stop])


@njit(parallel=True, cache=True)
def round_solve(gram_upper, linear, coef, rows, max_sweeps, sweep_tolerance, moved):
    """One round's solve of the samples ``rows`` (one per thread) from their Gram matrices'
    upper triangles (row by row), ``coef`` updated in place; ``moved``: the relative L1
    change of each one's coefficients."""
    n_types = coef.shape[1]
    for j in prange(rows.size):
        i = rows[j]
        gram = np.empty((n_types, n_types))
        p = 0
        for k in range(n_types):
            for m in range(k, n_types):
                gram[k, m] = gram_upper[j, p]
                gram[m, k] = gram_upper[j, p]
                p += 1
        new = coef[i].copy()
        _solve_round(gram, linear[j], new, max_sweeps, sweep_tolerance)
        change, size = 0.0, 0.0
        for k in range(n_types):
            change += abs(new[k] - coef[i, k])
            size += abs(coef[i, k])
            coef[i, k] = new[k]
        moved[j] = change / max(size, 1e-300)


# ---------------------------------------------- exact NNLS over a shared Gram matrix
# The robust fit's unweighted start, and the gene-weighted fit of an adapted model (and of
# adapt's proportion step), solved by round_solve one sample per thread.


def solve_shared(
    gram: np.ndarray,
    linear: np.ndarray,
    coef: np.ndarray,
    max_sweeps: int = 2000,
    tolerance: float = 1e-10,
) -> np.ndarray:
    """``min_c c' G c / 2 - l' c`` with ``c >= 0`` for every sample, all sharing one types ×
    types ``gram``, warm-started at ``coef`` (modified and returned): the robust fit's
    compiled coordinate descent (:func:`hpvade.core._robust_kernel.round_solve`), each sample
    stopping on its own ``tolerance``."""
    upper = np.triu_indices(gram.shape[0])
    shared = np.tile(gram[upper], (coef.shape[0], 1))
    moved = np.empty(coef.shape[0])
    rows = np.arange(coef.shape[0])
    round_solve(shared, np.ascontiguousarray(linear), coef, rows, max_sweeps, tolerance, moved)
    return coef


def scaled_start(initial: np.ndarray, gram: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """``initial`` (proportions) times the best total for each sample, clipped at 0."""
    coef = np.array(initial, dtype=float, copy=True)
    curvature = (
        np.einsum("sk,skl,sl->s", coef, gram, coef)
        if gram.ndim == 3
        else np.einsum("sk,kl,sl->s", coef, gram, coef)
    )
    coef *= (np.einsum("sk,sk->s", coef, linear) / np.maximum(curvature, 1e-300))[:, None]
    return np.clip(coef, 0.0, None, out=coef)


def unweighted_start(bulk: np.ndarray, signature: np.ndarray, initial) -> np.ndarray:
    """The robust fit's first estimate (samples × types coefficients): unweighted
    non-negative least squares, every sample sharing one Gram matrix, warm-started at
    ``initial`` (proportions) scaled to each sample's best total, or at 0."""
    gram = signature.T @ signature
    linear = bulk @ signature
    if initial is None:
        coef = np.zeros((bulk.shape[0], signature.shape[1]))
    else:
        coef = scaled_start(initial, gram, linear)
    return solve_shared(gram, linear, coef)


def weighted_nnls(
    bulk: np.ndarray,
    signature: np.ndarray,
    gene_weights: np.ndarray,
    initial: np.ndarray | None = None,
    max_sweeps: int = 2000,
    tolerance: float = 1e-10,
) -> np.ndarray:
    """Per-sample ``min_p sum_g w_g (b_g - (S p)_g)^2`` with ``p >= 0``, rescaled to sum to 1.

    Every sample shares the types × types Gram matrix ``S.T W S``; each is solved by exact
    coordinate descent (compiled, one sample per thread). ``initial`` (proportions)
    warm-starts it.
    """
    coef = weighted_coefficients(bulk, signature, gene_weights, initial, max_sweeps, tolerance)
    return rows_sum_to_one(coef)


def weighted_coefficients(
    bulk, signature, gene_weights, initial=None, max_sweeps=2000, tolerance=1e-10
):
    """The unnormalised coefficients of :func:`weighted_nnls`."""
    weighted = signature * gene_weights[:, None]
    gram = signature.T @ weighted
    linear = bulk @ weighted
    if initial is None:
        initial = np.full((bulk.shape[0], signature.shape[1]), 1.0 / signature.shape[1])
    start = scaled_start(initial, gram, linear)
    return solve_shared(gram, linear, start, max_sweeps, tolerance)


def rows_sum_to_one(coef: np.ndarray) -> np.ndarray:
    """Rescale rows to sum to 1; an all-zero row becomes uniform."""
    totals = coef.sum(axis=1, keepdims=True)
    return np.divide(coef, totals, out=np.full_like(coef, 1 / coef.shape[1]), where=totals > 0)
