"""Cell versus RNA fractions, the unexplained-sample flag, and the gene report."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hpvade

from .conftest import train_briefly

MISSING = "CD14+ Monocyte"


def _rna_reference(n_cells=600, n_genes=200, seed=0):
    """Four types with distinct profiles whose cells carry 1x, 1.6x, 2.5x and 4x the RNA."""
    rng = np.random.default_rng(seed)
    content = np.array([500.0, 800.0, 1250.0, 2000.0])
    profiles = rng.gamma(0.4, 1.0, size=(4, n_genes)) + 0.01
    profiles /= profiles.sum(1, keepdims=True)
    types = np.arange(n_cells) % 4
    library = rng.poisson(content[types] * rng.gamma(20.0, 1 / 20.0, n_cells))
    counts = rng.poisson(profiles[types] * library[:, None]).astype(np.float32)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{t}" for t in types])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=var, layers={"counts": sp.csr_matrix(counts)})


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def test_cell_and_rna_fractions_with_a_count_layer():
    reference, held_out = hpvade.datasets.split_by_type(_rna_reference(), "cell_type", 0.5, 0)
    bulk = hpvade.pp.simulate_pseudobulk(
        held_out, "cell_type", n_pseudobulk=100, counts_layer="counts", seed=3
    )
    cell_truth, rna_truth = bulk.obsm["proportions"], bulk.obsm["rna_proportions"]
    # the two truths differ: RNA-rich types take a larger share of the RNA
    assert _rmse(cell_truth, rna_truth) > 0.08

    model = train_briefly(reference, labels_key="cell_type", counts_layer="counts")
    ratio = model.rna_content_ / model.rna_content_.min()
    np.testing.assert_allclose(ratio, [1.0, 1.6, 2.5, 4.0], rtol=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = model.get_proportions(bulk.copy())
        rna = model.get_proportions(bulk.copy(), kind="rna")
    signature = hpvade.pp.build_signature(reference, "cell_type", counts_layer="counts")
    nnls = hpvade.baselines.nnls_proportions(bulk.X, signature)

    assert _rmse(cells, cell_truth) <= 0.03
    assert _rmse(rna, rna_truth) <= 0.03
    # NNLS on the CPM signature estimates RNA fractions, not cell fractions
    assert _rmse(nnls, rna_truth) < 0.03 < _rmse(nnls, cell_truth)
    assert _rmse(rna, cell_truth) > 0.08
    with pytest.raises(ValueError, match='"cell" or "rna"'):
        model.get_proportions(bulk.copy(), kind="cells")


def test_without_a_count_layer_both_kinds_agree(trained, test_bulk):
    assert trained.rna_content_ is None
    cells = trained.get_proportions(test_bulk.copy())
    rna = trained.get_proportions(test_bulk.copy(), kind="rna")
    np.testing.assert_allclose(cells.to_numpy(), rna.to_numpy())


def test_flag_catches_a_missing_type_and_spares_a_complete_reference(
    trained, missing_type_model, flag_bulk
):
    share = flag_bulk.obsm["proportions"][MISSING].to_numpy()
    complete = flag_bulk.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained.get_proportions(complete)
    # a few samples the reference explains are flagged, but not enough for a warning
    assert complete.obs["hpvade_unexplained"].mean() <= 0.07
    assert not [w for w in caught if "not explained by the reference" in str(w.message)]

    lacking = flag_bulk.copy()
    with pytest.warns(
        UserWarning, match=r"\d+ of 300 bulk samples \(\d+%\) are not explained"
    ) as record:
        missing_type_model.get_proportions(lacking)
    message = str(record[0].message)
    assert "cell type missing from the reference" in message and "batch" in message
    assert "more than the few per cent" in message
    flagged = lacking.obs["hpvade_unexplained"].to_numpy()
    assert flagged.dtype == bool
    # measured: 0.915 of the samples with >= 20 % of the missing type are flagged
    assert flagged[share >= 0.2].mean() >= 0.8
    threshold = missing_type_model.unexplained_threshold_
    np.testing.assert_array_equal(flagged, lacking.obs["hpvade_unexplained_score"] > threshold)


def test_gene_report_with_extra_reordered_and_all_zero_genes(trained, test_bulk):
    genes = list(trained.var_names)
    bulk = test_bulk[:10].copy()
    values = bulk.X.copy()
    values[:, :3] = 0  # three reference genes absent from every sample
    extra = np.ones((bulk.n_obs, 4), dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(genes) + 4)
    matrix = np.hstack([values, extra])[:, order]
    names = np.array(genes + [f"extra{i}" for i in range(4)])[order]
    shuffled = ad.AnnData(matrix, obs=bulk.obs[[]].copy(), var=pd.DataFrame(index=names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        props = trained.get_proportions(shuffled)
    report = shuffled.uns["hpvade_gene_report"]
    assert report["n_reference_genes"] == len(genes) == report["n_found"]
    assert report["missing_genes"] == []
    assert report["n_extra_ignored"] == 4
    assert sorted(report["extra_genes_example"]) == [f"extra{i}" for i in range(4)]
    assert report["n_all_zero"] == 3 and report["all_zero_genes"] == genes[:3]
    # reordering does not change the answer
    reference_order = bulk.copy()
    reference_order.X = values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = trained.get_proportions(reference_order)
    np.testing.assert_allclose(props.to_numpy(), expected.to_numpy(), atol=1e-5)


def test_intervals_are_calibrated_and_wider_where_errors_are_larger(trained, test_bulk):
    from scipy.stats import spearmanr

    bulk = test_bulk.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = trained.get_proportions(bulk, n_draws=20).to_numpy()
    lower = bulk.obsm["hpvade_proportions_lower"].to_numpy()
    upper = bulk.obsm["hpvade_proportions_upper"].to_numpy()
    spread = bulk.obsm["hpvade_proportions_std"].to_numpy()
    truth = test_bulk.obsm["proportions"].to_numpy()
    assert np.all(lower <= estimate + 1e-12) and np.all(estimate <= upper + 1e-12)
    assert np.all(spread >= 0) and spread.shape == estimate.shape
    assert trained.interval_scale_.shape == (estimate.shape[1],)
    coverage = np.mean((truth >= lower) & (truth <= upper))
    # measured: 0.890 on these 120 held-out pseudobulks (0.899 on 300 others)
    assert 0.80 <= coverage <= 0.97
    rho = spearmanr((upper - lower).ravel(), np.abs(estimate - truth).ravel())[0]
    assert rho > 0.3  # measured 0.54 (0.51 on the 300)
