"""Held-out test scenarios on scanpy's real PBMCs (shared by the accuracy benchmark and tests).

Cells are split 50/50 by type (fixed seed); methods see only the reference half; every test bulk
is simulated only from the other half, then perturbed as each scenario says.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

import hpvade
from hpvade.datasets import PBMC_LABELS_KEY

SPLIT_SEED = 0
MISSING_TYPE = "CD14+ Monocyte"


@dataclass
class Scenario:
    """One test set: the bulk (CPM), its true cell fractions and the reference methods see."""

    name: str
    description: str
    bulk: ad.AnnData
    truth: pd.DataFrame
    reference: ad.AnnData


def _recpm(x: np.ndarray) -> np.ndarray:
    return x / x.sum(axis=1, keepdims=True) * 1e6


def _with_x(bulk: ad.AnnData, x: np.ndarray) -> ad.AnnData:
    out = bulk.copy()
    out.X = _recpm(x).astype(np.float32)
    return out


def pbmc_split() -> tuple[ad.AnnData, ad.AnnData]:
    """(reference half, test half) of the 700 PBMCs, stratified by type."""
    cells = hpvade.datasets.pbmc68k_reference()
    return hpvade.datasets.split_by_type(cells, PBMC_LABELS_KEY, fraction=0.5, seed=SPLIT_SEED)


def simulate(test, n_samples=300, alpha=1.0, seed=1, labels_key=PBMC_LABELS_KEY) -> ad.AnnData:
    return hpvade.pp.simulate_pseudobulk(
        test,
        labels_key,
        n_pseudobulk=n_samples,
        cells_per_pseudobulk=500,
        dirichlet_alpha=alpha,
        seed=seed,
    )


def without_type(reference: ad.AnnData, labels_key: str, cell_type: str) -> ad.AnnData:
    """A copy of ``reference`` without the cells of ``cell_type`` (category dropped too)."""
    kept = reference[reference.obs[labels_key] != cell_type].copy()
    kept.obs[labels_key] = kept.obs[labels_key].cat.remove_unused_categories()
    return kept


def make_scenarios(
    reference: ad.AnnData, test: ad.AnnData, n_samples: int = 300, only: list[str] | None = None
) -> dict[str, Scenario]:
    """Build the seven scenarios of the accuracy benchmark (or the subset named in ``only``)."""
    rng = np.random.default_rng(123)
    clean = simulate(test, n_samples=n_samples, seed=1)
    x = np.asarray(clean.X, dtype=float)
    out: dict[str, Scenario] = {}

    def add(key, description, bulk, ref=reference):
        if only is None or key in only:
            out[key] = Scenario(key, description, bulk, bulk.obsm["proportions"], ref)

    add("1 clean", "Dirichlet a=1, 500 cells", clean)
    noisy = rng.poisson(x / 1e6 * 2e6).astype(float)
    add("2 noise", "Poisson at 2M reads", _with_x(clean, noisy))
    sparse = simulate(test, n_samples=n_samples, alpha=0.3, seed=2)
    add("3 sparse", "Dirichlet a=0.3", sparse)
    shift = np.exp(rng.normal(0, 0.5, size=x.shape[1]))
    add("4 shift", "gene-wise x exp(N(0,0.5^2))", _with_x(clean, x * shift))
    ref_missing = without_type(reference, PBMC_LABELS_KEY, MISSING_TYPE)
    add("5 missing", f"reference lacks {MISSING_TYPE}", clean, ref_missing)
    bio = simulate(test, n_samples=50, seed=3)
    xb = np.asarray(bio.X, dtype=float)
    noise = np.exp(rng.normal(0, 0.3, xb.shape))
    add("6 biovar", "50 samples x own exp(N(0,0.3^2))", _with_x(bio, xb * noise))
    add("7 small", "12 clean samples", simulate(test, n_samples=12, seed=4))
    return out
