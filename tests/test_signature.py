"""build_signature: the expm1 -> aggregate -> CPM recipe, and why it must be in that order."""

import numpy as np
import pytest
import scipy.sparse as sp

import hpvade
from hpvade.data._signature import signature_spread

from .conftest import LABELS, make_reference


def test_columns_sum_to_cpm_and_carry_signal(pbmc):
    S = hpvade.pp.build_signature(pbmc, LABELS)
    assert S.shape == (pbmc.n_vars, 10)
    assert list(S.index) == list(pbmc.var_names)
    np.testing.assert_allclose(S.sum(axis=0), 1e6, rtol=1e-4)
    assert (S.to_numpy() >= 0).all()
    assert S.std(axis=1).mean() > 10


def test_equals_cpm_of_per_type_sum(pbmc):
    S = hpvade.pp.build_signature(pbmc, LABELS)
    x = np.expm1(pbmc.X.toarray())
    for t in ["CD14+ Monocyte", "CD34+"]:
        total = x[(pbmc.obs[LABELS] == t).to_numpy()].sum(0)
        np.testing.assert_allclose(S[t], total / total.sum() * 1e6, rtol=1e-6)


def test_per_cell_cpm_then_average_is_flat_and_useless_but_ours_is_not(pbmc):
    """Failure mode 1: re-normalising each already-normalised (log) cell and averaging.

    On these 765 variable genes the bad recipe is not literally constant, but it compresses the
    differences between types (lower spread) and deconvolves pseudobulks of the very same cells
    far worse than the aggregate-then-normalise signature.
    """
    x = pbmc.X.toarray().astype(float)
    per_cell = x / x.sum(1, keepdims=True) * 1e6  # CPM of each log1p-normalised cell
    labels = pbmc.obs[LABELS].to_numpy()
    good = hpvade.pp.build_signature(pbmc, LABELS)
    bad = np.stack([per_cell[labels == t].mean(0) for t in good.columns], axis=1)
    assert signature_spread(bad) < 0.75 * signature_spread(good.to_numpy())

    pb = hpvade.pp.simulate_pseudobulk(pbmc, LABELS, n_pseudobulk=100, seed=0)
    truth = pb.obsm["proportions"].to_numpy()
    r_good = hpvade.metrics.pearson(hpvade.baselines.nnls_proportions(pb.X, good), truth)
    r_bad = hpvade.metrics.pearson(hpvade.baselines.nnls_proportions(pb.X, bad), truth)
    assert r_good > 0.93
    assert r_bad < 0.7


def test_flat_signature_warns():
    with pytest.warns(UserWarning, match="barely varies across cell types"):
        hpvade.data._signature.warn_if_flat(np.full((50, 4), 2e4) + np.arange(4) * 1e-3)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_formats_agree_and_chunks_do_not_matter(fmt):
    adata = make_reference(sparse=True)
    expected = hpvade.pp.build_signature(adata, "cell_type")
    if fmt == "dense":
        adata.X = adata.X.toarray()
    elif fmt == "csc":
        adata.X = sp.csc_matrix(adata.X)
    got = hpvade.pp.build_signature(adata, "cell_type", chunk_size=37)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-6)


def test_counts_layer_is_summed_linearly():
    adata = make_reference()
    S = hpvade.pp.build_signature(adata, "cell_type", counts_layer="counts")
    counts = adata.layers["counts"].toarray()
    mask = (adata.obs["cell_type"] == "type1").to_numpy()
    np.testing.assert_allclose(S["type1"], counts[mask].sum(0) / counts[mask].sum() * 1e6)


@pytest.mark.parametrize(
    ("layer", "log1p", "dense"), [(None, True, False), ("counts", False, True)]
)
def test_one_pass_gives_the_type_sums_and_cell_totals(layer, log1p, dense):
    """The model reads its reference once for S and the cells' totals: the per-type sums of
    the linear values, and the totals of the separate pass bit for bit."""
    from hpvade.data._pseudobulk import cell_totals
    from hpvade.data._signature import type_sums_and_cell_totals

    adata = make_reference(sparse=not dense)
    codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    sums, totals = type_sums_and_cell_totals(adata, codes, 3, layer, log1p, chunk_size=37)
    values = adata.X if layer is None else adata.layers[layer]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    linear = np.expm1(values) if log1p else values
    expected = np.stack([linear[codes == t].sum(axis=0) for t in range(3)])
    np.testing.assert_allclose(sums, expected, rtol=1e-5)  # float32 values, float64 sums
    np.testing.assert_array_equal(totals, cell_totals(adata, layer, log1p, 37))
