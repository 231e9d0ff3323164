"""The proportion estimator a model serves, and the fits behind it: pure functions of (bulk,
signature), callable without a model.

- :class:`ProportionEstimator`: the signature, the genes the fit uses and, after ``adapt``,
  the gene weights, as one object (:meth:`hpvade.HPVADE.estimator`;
  :func:`hpvade.tl.fit_proportions` builds one without a model);
- :func:`proportion_fit`: the one rule for which fit runs;
- :func:`robust_dampened_fit`: dampened weighted least squares with robust gene weights (the
  unadapted model's fit), its variance power measured by :func:`variance_power`; its rounds
  are compiled in ``_robust_kernel`` (CPU) and written in torch in ``_robust_torch``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from hpvade.core._diagnostics import unknown_share
from hpvade.core._robust_kernel import (
    TUKEY_CUTOFF,
    gram_products,
    round_solve,
    round_weights,
    rows_sum_to_one,
    unweighted_start,
    variance_powers,
    weighted_coefficients,
)
from hpvade.data._signature import scale_columns_to_cpm

#: Re-weighting rounds of the served fit (``n_rounds`` of ``get_proportions``).
DEFAULT_ROUNDS = 30
#: A sample's rounds stop once its coefficients change by less than this (relative L1).
ROUND_TOLERANCE = 1e-5
#: Rounds re-fitting each signature draw, started from the served estimate (intervals).
DRAW_ROUNDS = 10
#: Cap of the dampened weights ``1 / fitted^a``, as a multiple of each sample's median weight
#: (DWLS's dampening: without it a handful of barely expressed genes carry the fit).
WEIGHT_CAP = 32.0
#: Range of the variance power ``a`` in the gene weights ``1 / fitted^a``: 2 is relative error
#: (DWLS, Rectangle; protocol and biological variation), 1 is Poisson-like (counting noise).
VARIANCE_POWER_RANGE = (1.0, 2.0)
#: Bins of log fitted value in which the variance power is measured from the residuals.
VARIANCE_POWER_BINS = 10
#: Samples fitted together by the robust fit (memory; results equal within its tolerance).
FIT_CHUNK = 2048
#: ... on an accelerator, where a chunk is one batch of tensor operations: its temporaries
#: (about fifteen samples × genes float64 arrays: sorts, ratios, weights) come to some 2 GB
#: of device memory at 1,000 fitted genes, whatever the cohort's size.
DEVICE_FIT_CHUNK = 16_384
#: Where an accelerator's rounds solve their Gram matrices: ``"device"`` (torch, a few small
#: kernels per type and sweep) or ``"host"`` (copied to the compiled CPU kernel and back).
#: ``benchmarks/scale.py`` times both on a GPU; until a GPU measures ``"host"`` faster, the
#: device solves.
DEVICE_SOLVE_ON = "device"
#: Coordinate-descent sweeps and tolerance of a round's solve: warm-started and re-weighted
#: next round anyway, a loose solve per round suffices. Each sample stops on its own
#: tolerance; batched, every sample was swept until the slowest of its chunk met 1e-7, i.e.
#: nearly always 20 times, which a per-sample 1e-10 reproduces (proportions within 1e-15).
ROUND_SWEEPS, ROUND_SWEEP_TOLERANCE = 20, 1e-10


def variance_power(
    bulk: np.ndarray,
    fitted: np.ndarray,
    kept: np.ndarray,
    n_bins: int = VARIANCE_POWER_BINS,
    power_range: tuple[float, float] = VARIANCE_POWER_RANGE,
    log_fitted: np.ndarray | None = None,
) -> np.ndarray:
    """Per sample, the power ``a`` of ``Var(bulk_g) ∝ fitted_g^a`` measured from the residuals.

    The kept genes are binned by log fitted value (``n_bins`` equal widths per sample); ``a`` is
    the count-weighted least-squares slope of ``2 log mean|bulk - fitted|`` on the bins' mean
    log fitted value (the mean-variance trend, as voom or DESeq2 measure one), clipped to
    ``power_range``. Returns samples × 1. ``log_fitted``: ``log(fitted)`` when the caller has
    it.
    """
    fitted = np.ascontiguousarray(fitted, dtype=float)
    x = np.log(fitted) if log_fitted is None else np.ascontiguousarray(log_fitted, dtype=float)
    out = np.empty(fitted.shape[0])
    bulk = np.ascontiguousarray(bulk, dtype=float)
    variance_powers(bulk, fitted, x, np.ascontiguousarray(kept), n_bins, *power_range, out)
    return out[:, None]


def robust_dampened_fit(
    bulk: np.ndarray,
    signature: np.ndarray,
    initial: np.ndarray | None = None,
    n_rounds: int = DEFAULT_ROUNDS,
    weight_cap: float = WEIGHT_CAP,
    tukey_cutoff: float = TUKEY_CUTOFF,
    estimate_power: bool = True,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Dampened weighted least squares with robust gene weights, per sample (docs: "Proportions
    of a new bulk"): each round solves ``min_c sum_g w_g (b_g - (S c)_g)^2``, ``c >= 0``, with
    ``w_g = 1 / fitted_g^a`` capped, ``a`` measured from the sample's residuals
    (:func:`variance_power`), times a Tukey biweight of the gene's log ratio to the fit. The
    coefficients are not constrained to sum to 1.

    Parameters
    ----------
    bulk
        Samples × genes, CPM (the genes of ``signature``).
    signature
        Genes × types, CPM.
    initial
        Starting proportions (samples × types), e.g. the network's output; ``None`` starts
        from unweighted non-negative least squares.
    n_rounds
        Re-weighting rounds at most (a sample stops once it moves less than
        ``ROUND_TOLERANCE``).
    weight_cap, tukey_cutoff
        Cap of the weights (times the sample's median weight); biweight cut-off (robust SDs).
    estimate_power
        Measure the variance power per sample and round; ``False``: ``a = 2`` throughout.
    device
        A torch device other than the CPU: the same rounds in torch (``_robust_torch``).

    Returns
    -------
    ``(coefficients, weights)``: samples × types coefficients (the share of each sample's
    expression each type explains; not normalised) and the last round's samples × genes
    weights (0: the gene was set aside for that sample).
    """
    bulk = np.asarray(bulk, dtype=float)
    signature = np.asarray(signature, dtype=float)
    initial = None if initial is None else np.asarray(initial, dtype=float)
    common = {
        "signature": signature,
        "n_rounds": n_rounds,
        "weight_cap": weight_cap,
        "tukey_cutoff": tukey_cutoff,
        "estimate_power": estimate_power,
    }
    if device is not None and str(device).split(":")[0] != "cpu":
        from hpvade.core._robust_torch import robust_fit_torch

        fit_rows = functools.partial(
            robust_fit_torch,
            **common,
            device=device,
            round_tolerance=ROUND_TOLERANCE,
            sweeps=(ROUND_SWEEPS, ROUND_SWEEP_TOLERANCE),
            power_options=(VARIANCE_POWER_BINS, *VARIANCE_POWER_RANGE),
            solve_on=DEVICE_SOLVE_ON,
        )
        chunk, blas = DEVICE_FIT_CHUNK, contextlib.nullcontext()
    else:
        fit_rows = functools.partial(_robust_fit_rows, **common)
        # The rounds alternate compiled kernels on numba's threads with matrix products:
        # OpenBLAS's threads spin after each product and slow the kernels. One BLAS thread
        # meanwhile.
        chunk, blas = FIT_CHUNK, threadpool_limits(limits=1, user_api="blas")
    with blas:
        if bulk.shape[0] <= chunk:
            return fit_rows(bulk=bulk, initial=initial)
        # every sample's fit is its own: a chunk of samples at a time bounds the working memory
        coef = np.empty((bulk.shape[0], signature.shape[1]))
        weights = np.empty_like(bulk)
        for start in range(0, bulk.shape[0], chunk):
            rows = slice(start, start + chunk)
            coef[rows], weights[rows] = fit_rows(
                bulk=bulk[rows], initial=None if initial is None else initial[rows]
            )
    return coef, weights


def _robust_fit_rows(
    bulk, signature, initial, n_rounds, weight_cap, tukey_cutoff, estimate_power
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`robust_dampened_fit` on one chunk of samples: the exact unweighted start here,
    each round's weights and solves compiled (:mod:`hpvade.core._robust_kernel`), its Gram
    matrices one matrix product."""
    bulk, signature = np.ascontiguousarray(bulk), np.ascontiguousarray(signature)
    n_types = signature.shape[1]
    coef = unweighted_start(bulk, signature, initial)
    # products of signature columns k <= l: every sample's Gram matrix is one matmul
    upper = np.triu_indices(n_types)
    outer = signature[:, upper[0]] * signature[:, upper[1]]
    rows = np.arange(bulk.shape[0])  # the samples whose coefficients still move
    moved = np.empty(bulk.shape[0])
    weights = np.ones_like(bulk)
    block = np.empty_like(bulk)
    log_bulk = np.log2(bulk + 1.0)
    products = np.empty((bulk.shape[0], outer.shape[1]))
    power = (estimate_power, VARIANCE_POWER_BINS, *VARIANCE_POWER_RANGE)
    for _ in range(n_rounds):
        if rows.size == 0:
            break
        n, every = rows.size, rows.size == bulk.shape[0]
        b = bulk if every else bulk[rows]
        fitted = coef @ signature.T if every else coef[rows] @ signature.T
        round_weights(
            bulk, log_bulk, fitted, rows, weight_cap, tukey_cutoff, *power, weights, block[:n]
        )
        w = block[:n]
        gram_upper, linear = products[:n], (b * w) @ signature
        gram_products(w, outer, gram_upper, numba.get_num_threads())
        round_solve(gram_upper, linear, coef, rows, ROUND_SWEEPS, ROUND_SWEEP_TOLERANCE, moved)
        rows = rows[moved[:n] > ROUND_TOLERANCE]
    return coef, weights


class ProportionFit(NamedTuple):
    """What :func:`proportion_fit` returns."""

    #: samples × types, rows sum to 1
    proportions: np.ndarray
    #: per sample, the share of its expression the known types explain (sum of coefficients)
    explained: np.ndarray
    #: per fitted gene, the share of samples in which the robust fit set it aside (None for the
    #: other fits)
    set_aside: np.ndarray | None = None


def proportion_fit(
    bulk_cpm: np.ndarray,
    signature: np.ndarray,
    initial: np.ndarray,
    n_rounds: int,
    gene_weights: np.ndarray | None = None,
    genes: np.ndarray | None = None,
    device: str | None = None,
) -> ProportionFit:
    """The proportion fit a model serves, in one place.

    - ``n_rounds <= 0``: ``initial`` as is (the network's output).
    - With ``gene_weights`` (an adapted model): :func:`weighted_nnls` on every gene with a
      positive weight, exact, warm-started at ``initial``.
    - Otherwise: ``n_rounds`` rounds of :func:`robust_dampened_fit` on the rows ``genes``
      (the model's selected genes; ``None``: all), started at ``initial``, on ``device``
      when that is an accelerator (see :func:`robust_dampened_fit`).

    Returns
    -------
    A :class:`ProportionFit`: proportions, the explained share (1 for the network's output)
    and, for the robust fit, how often each of its genes was set aside.
    """
    initial = np.asarray(initial, dtype=float)
    if n_rounds <= 0:
        return ProportionFit(initial, np.ones(initial.shape[0]))
    if gene_weights is not None:
        coef = weighted_coefficients(bulk_cpm, signature, np.asarray(gene_weights, float), initial)
        return ProportionFit(rows_sum_to_one(coef), coef.sum(axis=1))
    if genes is not None:
        bulk_cpm, signature = bulk_cpm[:, genes], signature[genes]
    coef, weights = robust_dampened_fit(bulk_cpm, signature, initial, n_rounds, device=device)
    return ProportionFit(rows_sum_to_one(coef), coef.sum(axis=1), (weights == 0).mean(axis=0))


@dataclass(frozen=True)
class ProportionEstimator:
    """A bulk's proportions from a signature: the robust fit, or the adapted weighted fit.

    Attributes
    ----------
    signature
        Genes × types, CPM (columns sum to 1e6).
    fit_genes
        Boolean mask over the signature's genes: those the robust fit uses (the model's
        selected markers).
    gene_weights
        Per-gene weights of an adapted model's weighted fit (``None``: the robust fit).
    device
        Where the robust fit runs: ``None`` or ``"cpu"``, the compiled CPU kernels; an
        accelerator (``"cuda"``), the same fit in torch there (a model's own device).
    """

    signature: np.ndarray
    fit_genes: np.ndarray
    gene_weights: np.ndarray | None = None
    device: str | None = None

    @property
    def name(self) -> str:
        """``"weighted_nnls"`` (adapted) or ``"robust_dampened_wls"``."""
        return "weighted_nnls" if self.gene_weights is not None else "robust_dampened_wls"

    def gene_index(self, found: np.ndarray | None = None) -> np.ndarray:
        """Rows of the genes the robust fit uses (of those the bulk has, given ``found``)."""
        return np.flatnonzero(self.fit_genes if found is None else self.fit_genes & found)

    def fit(
        self,
        cpm: np.ndarray,
        initial: np.ndarray,
        n_rounds: int = DEFAULT_ROUNDS,
        found: np.ndarray | None = None,
        signature: np.ndarray | None = None,
    ) -> ProportionFit:
        """Fit every sample of ``cpm`` (samples × the signature's genes, CPM), started from
        ``initial``; ``found``: the genes the bulk has (the others are left out);
        ``signature``: another S on the same genes (a signature draw). ``n_rounds <= 0``
        returns ``initial`` as is."""
        signature = self.signature if signature is None else signature
        if self.gene_weights is None:
            genes = {"genes": self.gene_index(found), "device": self.device}
        else:
            weights = np.asarray(self.gene_weights, dtype=float)
            genes = {"gene_weights": weights if found is None else weights * found}
        return proportion_fit(cpm, signature, initial, n_rounds, **genes)

    def draws(
        self,
        cpm: np.ndarray,
        estimate: np.ndarray,
        ratios: np.ndarray,
        n_rounds: int,
        found: np.ndarray | None = None,
    ) -> np.ndarray:
        """Proportions re-fitted under each perturbed signature ``S * ratio`` (``ratios``:
        draws × genes × types), started from ``estimate``: draws × samples × types."""
        return np.stack(
            [
                self.fit(
                    cpm, estimate, n_rounds, found, scale_columns_to_cpm(self.signature * ratio)
                ).proportions
                for ratio in ratios
            ]
        )

    def unknown_share(
        self, cpm: np.ndarray, fit: ProportionFit, found: np.ndarray | None = None
    ) -> np.ndarray:
        """The share of each sample's expression the signature's types cannot explain (see
        :func:`hpvade.core._diagnostics.unknown_share`), on the genes the bulk has."""
        signature = self.signature
        if found is not None and not found.all():
            cpm, signature = cpm[:, found], signature[found]
        return unknown_share(cpm, fit.proportions * fit.explained[:, None], signature)
