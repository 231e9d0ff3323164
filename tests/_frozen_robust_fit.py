"""The robust dampened fit as it was at 0.2.0, frozen as the reference of the speed-up's
identity test (tests/test_robust_fit.py): copied from hpvade/_solvers.py at 0.2.0, with the
constants and the start it used, so that no later change to the library moves it."""

import numpy as np

ROUND_TOLERANCE = 1e-5
WEIGHT_CAP = 32.0
TUKEY_CUTOFF = 3.0


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


def _coordinate_descent(
    gram: np.ndarray,
    linear: np.ndarray,
    coef: np.ndarray,
    max_sweeps: int = 2000,
    tolerance: float = 1e-10,
) -> np.ndarray:
    """``min_c c' G c / 2 - l' c`` with ``c >= 0`` for every sample at once, warm-started at
    ``coef`` (modified). ``gram`` is one types × types matrix shared by all samples, or one
    per sample (samples × types × types). Exact coordinate descent: each sweep updates one type
    at a time for every sample (a loop over types, none over samples)."""
    per_sample = gram.ndim == 3
    diagonal = np.maximum(np.diagonal(gram, axis1=-2, axis2=-1), 1e-300)
    gradient = (np.einsum("sk,skl->sl", coef, gram) if per_sample else coef @ gram) - linear
    scale = np.maximum(np.abs(linear).max(axis=1), 1e-300)
    # everything by type first, so that one type's values are contiguous over samples
    rows = np.ascontiguousarray(gram.transpose(1, 2, 0)) if per_sample else gram[:, :, None]
    curvatures = np.ascontiguousarray(diagonal.T) if per_sample else diagonal[:, None]
    coef_t, gradient_t = np.ascontiguousarray(coef.T), np.ascontiguousarray(gradient.T)
    for _ in range(max_sweeps):
        largest = np.zeros(coef.shape[0])
        for t in range(coef.shape[1]):
            new = np.maximum(coef_t[t] - gradient_t[t] / curvatures[t], 0.0)
            step = new - coef_t[t]
            coef_t[t] = new
            gradient_t += step[None, :] * rows[t]
            np.maximum(largest, np.abs(step) * curvatures[t], out=largest)
        if (largest / scale).max() < tolerance:
            break
    coef[:] = coef_t.T
    return coef


def _log_ratio_deviation(bulk: np.ndarray, fitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each gene's ``log2((b + 1) / (fitted + 1))`` minus the sample's median ratio, and the
    sample's robust standard deviation of the ratios (1.4826 × MAD)."""
    ratio = np.log2((bulk + 1.0) / (fitted + 1.0))
    deviation = ratio - np.median(ratio, axis=1, keepdims=True)
    return deviation, 1.4826 * np.median(np.abs(deviation), axis=1, keepdims=True)


def variance_power(
    bulk: np.ndarray,
    fitted: np.ndarray,
    kept: np.ndarray,
    n_bins: int = 10,
    power_range: tuple[float, float] = (1.0, 2.0),
) -> np.ndarray:
    """Per sample, the power ``a`` of ``Var(bulk_g) ∝ fitted_g^a`` measured from the residuals.

    The kept genes are binned by log fitted value (``n_bins`` equal widths per sample); ``a`` is
    the count-weighted least-squares slope of ``2 log mean|bulk - fitted|`` on the bins' mean
    log fitted value (the mean-variance trend, as voom or DESeq2 measure one), clipped to
    ``power_range``. Returns samples × 1.
    """
    x = np.log(fitted)
    low = np.where(kept, x, np.inf).min(axis=1, keepdims=True)
    high = np.where(kept, x, -np.inf).max(axis=1, keepdims=True)
    low[~np.isfinite(low)] = 0.0  # a sample with no kept gene: slope 0, clipped
    width = np.maximum(high - low, 1e-12) / n_bins
    bins = np.clip(((x - low) / width).astype(int), 0, n_bins - 1)
    # one bincount per statistic over (sample, bin) pairs of the kept genes
    flat = (np.arange(x.shape[0])[:, None] * n_bins + bins)[kept]
    shape, length = (x.shape[0], n_bins), x.shape[0] * n_bins
    counts = np.bincount(flat, minlength=length).reshape(shape).astype(float)
    size = np.maximum(counts, 1.0)
    centres = np.bincount(flat, x[kept], length).reshape(shape) / size
    spread = np.bincount(flat, np.abs(bulk - fitted)[kept], length).reshape(shape) / size
    levels = 2.0 * np.log(spread + 1e-12)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    dx = centres - (share * centres).sum(axis=1, keepdims=True)
    dy = levels - (share * levels).sum(axis=1, keepdims=True)
    slope = (share * dx * dy).sum(axis=1) / np.maximum((share * dx**2).sum(axis=1), 1e-300)
    return np.clip(slope, *power_range)[:, None]


def robust_dampened_fit(
    bulk: np.ndarray,
    signature: np.ndarray,
    initial: np.ndarray | None = None,
    n_rounds: int = 30,
    weight_cap: float = WEIGHT_CAP,
    tukey_cutoff: float = TUKEY_CUTOFF,
    estimate_power: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Dampened weighted least squares with robust gene weights, per sample.

    Each round solves ``min_c sum_g w_g (b_g - (S c)_g)^2``, ``c >= 0``, exactly, with
    ``w_g = 1 / fitted_g^a`` capped at ``weight_cap`` times the sample's median weight. The
    variance power ``a`` is measured in every round from the sample's own residuals
    (:func:`variance_power`, between 1 and 2): 2 means relative errors, as DWLS and Rectangle
    weigh genes, right where protocol and biological variation dominate; near 1 counting noise
    dominates and relative weights would over-trust the weakly expressed genes. The weights
    are multiplied by a Tukey biweight of the gene's log
    ratio ``log2((b + 1) / (fitted + 1))`` centred on the sample's median ratio and scaled by
    ``tukey_cutoff`` robust standard deviations. A gene a protocol distorts (3' UMI reference
    against full-length bulk, gene length in read counts) or that cells missing from the
    reference express falls outside and stops pulling the fit. The coefficients are not
    constrained to sum to 1: their sum is the share of the sample's expression that the
    known types explain.

    The choices (biweight, cap, measured power) were measured on real PBMC bulk against flow
    cytometry and on pseudobulk scenarios (``benchmarks/real.py``, ``benchmarks/robustness.py``).

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
        Re-weighting rounds at most; a sample stops once its coefficients change by less than
        ``ROUND_TOLERANCE`` (relative) between rounds.
    weight_cap
        Cap of the dampened weights, in multiples of the sample's median weight.
    tukey_cutoff
        Biweight cut-off in robust standard deviations of the log ratios.
    estimate_power
        Measure the variance power per sample and round; ``False``: ``a = 2`` throughout.

    Returns
    -------
    ``(coefficients, weights)``: samples × types coefficients (the share of each sample's
    expression each type explains; not normalised) and the last round's samples × genes
    weights (0: the gene was set aside for that sample).
    """
    bulk = np.asarray(bulk, dtype=float)
    signature = np.asarray(signature, dtype=float)
    n_genes, n_types = signature.shape
    # products of signature rows, so that every sample's Gram matrix is one matmul
    outer = (signature[:, :, None] * signature[:, None, :]).reshape(n_genes, n_types**2)
    weights = np.ones_like(bulk)
    gram = signature.T @ signature
    linear = bulk @ signature
    if initial is None:
        coef = _coordinate_descent(gram, linear, np.zeros((bulk.shape[0], n_types)))
    else:
        coef = _coordinate_descent(gram, linear, scaled_start(initial, gram, linear))
    floor = 1e-3 * bulk.mean(axis=1, keepdims=True)
    active = np.arange(bulk.shape[0])  # samples whose coefficients still move
    for _ in range(n_rounds):
        if active.size == 0:
            break
        b, c = bulk[active], coef[active]
        fitted = c @ signature.T
        deviation, spread = _log_ratio_deviation(b, fitted)
        u = deviation / (tukey_cutoff * (spread + 1e-9))
        biweight = np.where(np.abs(u) < 1.0, (1.0 - u**2) ** 2, 0.0)
        fitted = np.maximum(fitted, floor[active])
        power = variance_power(b, fitted, biweight > 0) if estimate_power else 2.0
        w = fitted**-power
        np.minimum(w, weight_cap * np.median(w, axis=1, keepdims=True), out=w)
        w *= biweight
        weights[active] = w
        gram = (w @ outer).reshape(-1, n_types, n_types)
        # warm-started and re-weighted next round anyway: a loose solve per round suffices
        new = _coordinate_descent(gram, (b * w) @ signature, c.copy(), 20, 1e-7)
        change = np.abs(new - c).sum(axis=1) / np.maximum(np.abs(c).sum(axis=1), 1e-300)
        coef[active] = new
        active = active[change > ROUND_TOLERANCE]
    return coef, weights
