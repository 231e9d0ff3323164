"""simulate_pseudobulk: CPM rows, recorded fractions, determinism, linear mixing."""

import numpy as np
import scipy.sparse as sp

import hpvade

from .conftest import LABELS, make_reference


def test_rows_are_cpm_and_fractions_are_recorded(pbmc):
    pb = hpvade.pp.simulate_pseudobulk(
        pbmc, LABELS, n_pseudobulk=40, cells_per_pseudobulk=200, seed=3
    )
    assert pb.shape == (40, pbmc.n_vars)
    np.testing.assert_allclose(pb.X.sum(1), 1e6, rtol=1e-5)
    props = pb.obsm["proportions"]
    assert list(props.columns) == list(pbmc.obs[LABELS].cat.categories)
    np.testing.assert_allclose(props.sum(1), 1.0)
    # fractions are multiples of 1 / cells_per_sample: counts of sampled cells
    np.testing.assert_allclose(props * 200, np.round(props * 200), atol=1e-9)


def test_same_seed_same_output_different_seed_differs(pbmc):
    a = hpvade.pp.simulate_pseudobulk(pbmc, LABELS, n_pseudobulk=10, seed=5)
    b = hpvade.pp.simulate_pseudobulk(pbmc, LABELS, n_pseudobulk=10, seed=5)
    c = hpvade.pp.simulate_pseudobulk(pbmc, LABELS, n_pseudobulk=10, seed=6)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.allclose(a.X, c.X)


def test_mixing_is_linear_in_signature_space():
    """With one cell per type, a pseudobulk is exactly p @ S.T of those cells' profiles."""
    adata = make_reference(n_cells=3, n_types=3)
    pb = hpvade.pp.simulate_pseudobulk(
        adata, "cell_type", n_pseudobulk=5, cells_per_pseudobulk=1000
    )
    x = np.expm1(adata.X.toarray().astype(float))
    per_type = x / x.sum(1, keepdims=True)  # each type has exactly one cell
    props = pb.obsm["proportions"].to_numpy()
    mixed = props @ (per_type * x.sum(1, keepdims=True))
    expected = mixed / mixed.sum(1, keepdims=True) * 1e6
    np.testing.assert_allclose(pb.X, expected, rtol=1e-4)


def test_counts_layer_and_dense_input():
    adata = make_reference(sparse=False)
    pb = hpvade.pp.simulate_pseudobulk(
        adata, "cell_type", n_pseudobulk=6, counts_layer="counts", seed=0
    )
    np.testing.assert_allclose(pb.X.sum(1), 1e6, rtol=1e-5)
    adata_sparse = adata.copy()
    adata_sparse.layers["counts"] = sp.csr_matrix(adata.layers["counts"])
    pb2 = hpvade.pp.simulate_pseudobulk(
        adata_sparse, "cell_type", n_pseudobulk=6, counts_layer="counts", seed=0
    )
    np.testing.assert_allclose(pb.X, pb2.X, rtol=1e-5)


def test_mixing_kernel_equals_sparse_product_in_every_chunking():
    """The compiled kernel and chunked CSR views give exactly scipy's counts @ X."""
    from hpvade.data._kernels import add_sampled_rows
    from hpvade.data._matrix import csr_row_view

    rng = np.random.default_rng(0)
    X = sp.random(300, 50, density=0.1, format="csr", dtype=np.float32, random_state=1)
    counts = sp.csr_matrix(
        (
            rng.integers(1, 3, 900).astype(float),
            (rng.integers(0, 20, 900), rng.integers(0, 300, 900)),
        ),
        shape=(20, 300),
    )
    expected = (counts @ X.astype(np.float64)).toarray()
    for chunk in (300, 64, 1):
        out = np.zeros((20, 50))
        csc = counts.tocsc()
        for start in range(0, 300, chunk):
            stop = min(start + chunk, 300)
            add_sampled_rows(out, csc[:, start:stop].tocsr(), csr_row_view(X, start, stop))
        np.testing.assert_allclose(out, expected, rtol=1e-6)
