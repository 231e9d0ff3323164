"""Shared fixtures: the real PBMC reference that ships with scanpy, and a small trained model."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scvi

import hpvade
from hpvade.datasets import PBMC_LABELS_KEY

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

LABELS = PBMC_LABELS_KEY
#: Session fixtures that train a model on real cells: a test that uses one is ``slow``.
TRAINING_FIXTURES = {"trained", "missing_type_model"}


def pytest_collection_modifyitems(items):
    """Mark every test that trains on real cells through a fixture as ``slow``."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pbmc():
    """700 real PBMCs (log1p-normalised, sparse) with 10 labelled types."""
    return hpvade.datasets.pbmc68k_reference()


@pytest.fixture(scope="session")
def pbmc_split(pbmc):
    """50/50 split stratified by type: (reference half, test half)."""
    return hpvade.datasets.split_by_type(pbmc, LABELS, fraction=0.5, seed=0)


@pytest.fixture(scope="session")
def trained(pbmc_split):
    """An HPVADE model trained briefly on the reference half (shared by read-only tests)."""
    return train_briefly(pbmc_split[0].copy())


@pytest.fixture(scope="session")
def test_bulk(pbmc_split):
    """Held-out pseudobulks simulated from the test half only."""
    return hpvade.pp.simulate_pseudobulk(
        pbmc_split[1], LABELS, n_pseudobulk=120, cells_per_pseudobulk=500, seed=1
    )


@pytest.fixture(scope="session")
def missing_type_model(pbmc_split):
    """A model trained on the reference half without its CD14+ monocytes."""
    ref = pbmc_split[0][pbmc_split[0].obs[LABELS] != "CD14+ Monocyte"].copy()
    ref.obs[LABELS] = ref.obs[LABELS].cat.remove_unused_categories()
    return train_briefly(ref)


@pytest.fixture(scope="session")
def flag_bulk(pbmc_split):
    """300 held-out pseudobulks (all types, monocytes included)."""
    return hpvade.pp.simulate_pseudobulk(pbmc_split[1], LABELS, n_pseudobulk=300, seed=1)


def train_briefly(ref, max_epochs: int = 60, **setup_kwargs):
    """Register ``ref`` (labels ``LABELS`` unless given) and train a default model, seed 0."""
    scvi.settings.seed = 0
    setup_kwargs.setdefault("labels_key", LABELS)
    hpvade.HPVADE.setup_anndata(ref, **setup_kwargs)
    model = hpvade.HPVADE(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=max_epochs, enable_progress_bar=False)
    return model


def make_reference(n_cells=200, n_genes=60, n_types=3, seed=0, sparse=True):
    """A tiny synthetic log1p-normalised reference with distinct type profiles."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.5, 1.0, size=(n_types, n_genes)) + 0.01
    types = rng.integers(0, n_types, n_cells)
    types[:n_types] = np.arange(n_types)
    counts = rng.poisson(profiles[types] * 20).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1
    norm = counts / counts.sum(1, keepdims=True) * 1e4
    x = np.log1p(norm).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(x) if sparse else x,
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([f"type{t}" for t in types])},
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )
    adata.layers["counts"] = sp.csr_matrix(counts) if sparse else counts
    return adata
