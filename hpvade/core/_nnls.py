"""Exact non-negative least squares for many samples that share one Gram matrix: the robust
fit's unweighted start, and the gene-weighted fit of an adapted model (and of ``adapt``'s
proportion step). Solved by the robust fit's compiled coordinate descent
(:func:`hpvade.core._robust_kernel.round_solve`), one sample per thread."""

from __future__ import annotations

import numpy as np

from hpvade.core._robust_kernel import round_solve


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
