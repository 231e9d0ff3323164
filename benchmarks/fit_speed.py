"""The robust fit's time on many bulks: the current fit against the fit as it was at 0.2.0
(``tests/_frozen_robust_fit.py``), side by side on the same synthetic data in one run, best
of two runs each, with the largest difference of their proportions.

Synthetic: 20 types, 1,000 genes (a model's 50 selected markers a type), log-normal
gene-wise noise and Poisson counts, started from random proportions. Run
``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/fit_speed.py [--samples 10000]``;
writes ``results/fit_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from provenance import stamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpvade.core._estimator import robust_dampened_fit
from tests._frozen_robust_fit import robust_dampened_fit as frozen


def data(n_samples: int, n_genes: int = 1000, n_types: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    signature = rng.gamma(0.5, 1.0, size=(n_genes, n_types)) * 50
    signature = signature / signature.sum(axis=0) * 1e6
    truth = rng.dirichlet(np.ones(n_types), n_samples)
    noise = rng.lognormal(0, 0.5, size=(n_samples, n_genes))
    bulk = rng.poisson(truth @ signature.T * noise + 0.1).astype(float)
    bulk = bulk / bulk.sum(axis=1, keepdims=True) * 1e6
    return bulk, signature, rng.dirichlet(np.ones(n_types), n_samples)


def best_of_two(function, *args) -> tuple[float, np.ndarray]:
    times = []
    for _ in range(2):
        started = time.perf_counter()
        coef, _ = function(*args)
        times.append(time.perf_counter() - started)
    return min(times), coef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parent / "results" / "fit_speed.md")
    )
    args = parser.parse_args()
    produced_by = stamp()
    bulk, signature, start = data(args.samples)
    robust_dampened_fit(bulk[:10], signature, start[:10])  # compile the kernels first
    old, coef_old = best_of_two(frozen, bulk, signature, start)
    new, coef_new = best_of_two(robust_dampened_fit, bulk, signature, start)
    p_old = coef_old / coef_old.sum(axis=1, keepdims=True)
    p_new = coef_new / coef_new.sum(axis=1, keepdims=True)
    lines = [
        "# Robust fit speed (`benchmarks/fit_speed.py`)",
        "",
        f"Produced by `benchmarks/fit_speed.py` at {produced_by}; CPU, "
        f"{os.cpu_count()} cores, best of two runs each, side by side in one run.",
        "",
        f"{args.samples:,} synthetic samples × {signature.shape[0]:,} genes × "
        f"{signature.shape[1]} types: the fit at 0.2.0 {old:.2f} s, the current fit {new:.2f} s "
        f"({old / new:.2f} times faster); largest difference of the proportions "
        f"{np.abs(p_old - p_new).max():.1e}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
