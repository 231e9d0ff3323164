"""Property-based tests (hypothesis) for signature building and pseudobulk simulation."""

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpvade

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def references(draw):
    """Small log1p-normalised references: 2-4 types, each with at least one expressed cell."""
    n_types = draw(st.integers(2, 4))
    n_genes = draw(st.integers(3, 12))
    n_cells = draw(st.integers(n_types, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(n_types), rng.integers(0, n_types, n_cells - n_types)])
    counts = rng.poisson(rng.gamma(1.0, 3.0, size=(n_cells, n_genes))).astype(float)
    counts[counts.sum(1) == 0, 0] = 1.0
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    sparse = draw(st.booleans())
    return ad.AnnData(
        X=sp.csr_matrix(x) if sparse else x,
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([f"t{t}" for t in labels])},
            index=[f"c{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@SETTINGS
@given(references(), st.integers(0, 10_000))
def test_signature_properties(adata, seed):
    S = hpvade.pp.build_signature(adata, "cell_type")
    values = S.to_numpy()
    assert (values >= 0).all()
    np.testing.assert_allclose(values.sum(0), 1e6, rtol=1e-9)
    # equal to the CPM of the per-type sum of expm1(X)
    x = np.expm1(_dense(adata.X).astype(float))
    for t in S.columns:
        total = x[(adata.obs["cell_type"] == t).to_numpy()].sum(0)
        np.testing.assert_allclose(S[t], total / total.sum() * 1e6, rtol=1e-9, atol=1e-6)
    # invariant to cell order
    order = np.random.default_rng(seed).permutation(adata.n_obs)
    shuffled = hpvade.pp.build_signature(adata[order].copy(), "cell_type")
    np.testing.assert_allclose(shuffled.to_numpy(), values, rtol=1e-9, atol=1e-6)


@SETTINGS
@given(
    references(), st.integers(1, 20), st.integers(1, 50), st.floats(0.1, 5.0), st.integers(0, 99)
)
def test_pseudobulk_properties(adata, n_samples, cells, alpha, seed):
    def simulate():
        return hpvade.pp.simulate_pseudobulk(
            adata,
            "cell_type",
            n_pseudobulk=n_samples,
            cells_per_pseudobulk=cells,
            dirichlet_alpha=alpha,
            seed=seed,
        )

    pb = simulate()
    x = _dense(pb.X)
    np.testing.assert_allclose(x.sum(1), 1e6, rtol=1e-5)
    assert (x >= 0).all()
    props = pb.obsm["proportions"].to_numpy()
    np.testing.assert_allclose(props.sum(1), 1.0)
    # recorded proportions are sampled cell fractions: whole cells out of `cells`
    np.testing.assert_allclose(props * cells, np.round(props * cells), atol=1e-9)
    again = simulate()
    np.testing.assert_array_equal(_dense(again.X), x)
    np.testing.assert_array_equal(again.obsm["proportions"].to_numpy(), props)
