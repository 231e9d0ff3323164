"""The robust fit (``hpvade.core._estimator.robust_dampened_fit``) in torch, batched over
samples, for a model on a GPU: the same rounds, weights, solves and stops as the compiled CPU
kernels (``hpvade.core._robust_kernel``), each step one tensor operation over every active sample.

On a CPU the compiled kernels are faster (they run one sample per thread without a
samples × genes temporary per statistic), so this path serves only models on an accelerator;
tests run it on the CPU against the kernels (``tests/test_robust_fit.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hpvade.core._robust_kernel import unweighted_start

#: log(x) as log2(x) × ln 2, as the compiled kernels compute it
LN2 = math.log(2.0)


def _median(values: torch.Tensor) -> torch.Tensor:
    """Row medians as ``np.median`` computes them (the mean of the two middle values of an
    even count; ``torch.median`` returns the lower one)."""
    n = values.shape[1]
    ordered = torch.sort(values, dim=1).values
    if n % 2:
        return ordered[:, n // 2]
    return (ordered[:, n // 2 - 1] + ordered[:, n // 2]) / 2.0


def _variance_powers(bulk, fitted, log_fitted, kept, n_bins, low_power, high_power):
    """``hpvade.core._robust_kernel.variance_power_row`` of every row at once."""
    n_kept = kept.sum(dim=1)
    inf = torch.tensor(math.inf, dtype=bulk.dtype, device=bulk.device)
    low = torch.where(kept, log_fitted, inf).amin(dim=1)
    high = torch.where(kept, log_fitted, -inf).amax(dim=1)
    low = torch.where(n_kept > 0, low, torch.zeros_like(low))
    width = torch.clamp(high - low, min=1e-12) / n_bins
    position = torch.where(kept, (log_fitted - low[:, None]) / width[:, None], 0.0)
    bins = torch.clamp(position.to(torch.int64), 0, n_bins - 1)  # int() truncates, as there
    on = kept.to(bulk.dtype)
    counts = torch.zeros(bulk.shape[0], n_bins, dtype=bulk.dtype, device=bulk.device)
    centres, spread = torch.zeros_like(counts), torch.zeros_like(counts)
    counts.scatter_add_(1, bins, on)
    centres.scatter_add_(1, bins, log_fitted * on)
    spread.scatter_add_(1, bins, (bulk - fitted).abs() * on)
    total = torch.clamp(counts.sum(dim=1, keepdim=True), min=1.0)
    size = torch.clamp(counts, min=1.0)
    centres = centres / size
    levels = 2.0 * torch.log(spread / size + 1e-12)
    share = counts / total
    mean_x = (share * centres).sum(dim=1, keepdim=True)
    mean_y = (share * levels).sum(dim=1, keepdim=True)
    cross = (share * (centres - mean_x) * (levels - mean_y)).sum(dim=1)
    square = (share * (centres - mean_x) ** 2).sum(dim=1)
    return torch.clamp(cross / torch.clamp(square, min=1e-300), low_power, high_power)


def _round_weights(bulk, fitted, weight_cap, tukey_cutoff, estimate_power, power_options):
    """``hpvade.core._robust_kernel.round_weights`` of every row at once: the dampened weights
    ``1 / fitted^a`` capped at ``weight_cap`` × the sample's median, times a Tukey biweight
    of the centred log ratios."""
    floor = bulk.sum(dim=1, keepdim=True) * (1e-3 / bulk.shape[1])
    ratio = torch.log2(bulk + 1.0) - torch.log2(fitted + 1.0)
    ratio = ratio - _median(ratio)[:, None]
    spread = 1.4826 * _median(ratio.abs())
    scaled = ratio / (tukey_cutoff * (spread + 1e-9))[:, None]
    biweight = torch.clamp(1.0 - scaled * scaled, min=0.0) ** 2
    fitted = torch.maximum(fitted, floor)
    log_fitted = torch.log2(fitted) * LN2
    if estimate_power:
        kept = biweight > 0.0
        power = _variance_powers(bulk, fitted, log_fitted, kept, *power_options)
    else:
        power = torch.full((bulk.shape[0],), 2.0, dtype=bulk.dtype, device=bulk.device)
    weights = torch.exp(log_fitted * -power[:, None])
    cap = weight_cap * _median(weights)
    return torch.minimum(weights, cap[:, None]) * biweight


def _solve(gram, linear, coef, max_sweeps, tolerance):
    """``hpvade.core._robust_kernel._solve_round`` for every sample at once (``gram``: samples ×
    types × types, symmetric): coordinate descent sweeps, each sample stopping after the
    first sweep whose largest step is below ``tolerance`` (relative). Returns the new
    coefficients; ``coef`` is not modified."""
    coef = coef.clone()
    gradient = torch.bmm(gram, coef[:, :, None])[:, :, 0] - linear
    scale = torch.clamp(linear.abs().amax(dim=1), min=1e-300)
    curvatures = torch.clamp(torch.diagonal(gram, dim1=1, dim2=2), min=1e-300)
    active = torch.ones(coef.shape[0], dtype=torch.bool, device=coef.device)
    for _ in range(max_sweeps):
        largest = torch.zeros_like(scale)
        for t in range(coef.shape[1]):
            new = torch.clamp(coef[:, t] - gradient[:, t] / curvatures[:, t], min=0.0)
            step = torch.where(active, new - coef[:, t], 0.0)
            coef[:, t] = torch.where(active, new, coef[:, t])
            gradient += step[:, None] * gram[:, t, :]
            largest = torch.maximum(largest, step.abs() * curvatures[:, t])
        active &= largest / scale >= tolerance
        if not bool(active.any()):
            break
    return coef


def _solve_on_host(gram_upper, linear, coef, sweeps):
    """The round's solve by the compiled CPU kernel (``round_solve``) from the Gram matrices'
    upper triangles; returns the new coefficients and their relative change on the device."""
    from hpvade.core._robust_kernel import round_solve

    new = coef.cpu().numpy().copy()
    moved = np.empty(new.shape[0])
    rows = np.arange(new.shape[0])
    round_solve(gram_upper.cpu().numpy(), linear.cpu().numpy(), new, rows, *sweeps, moved)
    return torch.as_tensor(new, device=coef.device), torch.as_tensor(moved, device=coef.device)


def robust_fit_torch(
    bulk: np.ndarray,
    signature: np.ndarray,
    initial: np.ndarray | None,
    n_rounds: int,
    weight_cap: float,
    tukey_cutoff: float,
    estimate_power: bool,
    device: str | torch.device,
    round_tolerance: float,
    sweeps: tuple[int, float],
    power_options: tuple[int, float, float],
    solve_on: str = "device",
) -> tuple[np.ndarray, np.ndarray]:
    """``robust_dampened_fit``'s rounds on ``device`` in float64; returns numpy
    ``(coefficients, weights)`` as the compiled path does. ``sweeps``: a round's solve's
    (sweeps, tolerance); ``power_options``: (bins, lowest, highest power). ``solve_on="host"``
    copies each round's Gram matrices to the CPU and solves them there with the compiled
    kernel (a few small launches per type and sweep on the device become one copy each way)."""
    options = {"dtype": torch.float64, "device": device}
    b = torch.as_tensor(np.ascontiguousarray(bulk), **options)
    s = torch.as_tensor(np.ascontiguousarray(signature), **options)
    n_samples, n_types = b.shape[0], s.shape[1]
    # the unweighted start, as the CPU path computes it (one shared Gram matrix: its up to
    # 2,000 sweeps are cheap compiled and would be thousands of kernel launches here)
    start = unweighted_start(np.ascontiguousarray(bulk), np.ascontiguousarray(signature), initial)
    coef = torch.as_tensor(start, **options)
    upper = torch.triu_indices(n_types, n_types, device=b.device)
    outer = s[:, upper[0]] * s[:, upper[1]]
    weights = torch.ones_like(b)
    rows = torch.arange(n_samples, device=b.device)  # the samples whose coefficients move
    for _ in range(n_rounds):
        if rows.numel() == 0:
            break
        current, bulk_rows = coef[rows], b[rows]
        w = _round_weights(
            bulk_rows, current @ s.T, weight_cap, tukey_cutoff, estimate_power, power_options
        )
        weights[rows] = w
        products = w @ outer  # each sample's Gram matrix, its upper triangle row by row
        linear = (bulk_rows * w) @ s
        if solve_on == "host":
            new, moved = _solve_on_host(products, linear, current, sweeps)
        else:
            gram_rows = torch.empty(rows.numel(), n_types, n_types, **options)
            gram_rows[:, upper[0], upper[1]] = products
            gram_rows[:, upper[1], upper[0]] = products
            new = _solve(gram_rows, linear, current, *sweeps)
            moved = (new - current).abs().sum(dim=1) / torch.clamp(
                current.abs().sum(dim=1), min=1e-300
            )
        coef[rows] = new
        rows = rows[moved > round_tolerance]
    return coef.cpu().numpy(), weights.cpu().numpy()
