"""Adaptation to the user's bulk and the fit-quality score (fast versions of the benchmark)."""

import numpy as np
import pytest
import scvi
from scipy.optimize import nnls

import hpvade
from hpvade.core._robust_kernel import weighted_nnls
from hpvade.core._signature_fit import gene_noise_weights
from hpvade.data._bulk import bulk_to_cpm

from .conftest import LABELS

#: Measured on this suite's 60-epoch model and 120 held-out clean pseudobulks: NNLS r = 0.65,
#: adapted hpvade r = 0.94 (40 rounds); the margin guards against regressions.
ADAPT_MARGIN_OVER_NNLS = 0.15
#: Same model, 50 held-out pseudobulks, each gene of each sample × exp(N(0, 0.3^2)) (the
#: benchmark's scenario 6): alternating NNLS r = 0.69, unadapted 0.72, adapted 0.91.
ADAPT_MARGIN_OVER_ALTERNATING_NNLS = 0.1


@pytest.fixture(scope="module")
def adapted(trained, test_bulk, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapt") / "model"
    trained.save(path, overwrite=True)
    model = hpvade.HPVADE.load(path, adata=trained.adata)
    bulk = test_bulk.copy()
    info = model.adapt(bulk, max_iterations=40)
    return model, bulk, info


def test_adapted_beats_nnls_on_clean_pseudobulks(adapted, pbmc_split):
    model, bulk, _ = adapted
    props = model.get_proportions(bulk)
    truth = bulk.obsm["proportions"]
    S = hpvade.pp.build_signature(pbmc_split[0], LABELS)
    nnls = hpvade.baselines.nnls_proportions(bulk_to_cpm(bulk, S.index), S)
    r_nnls = hpvade.metrics.pearson(nnls, truth.to_numpy())
    r_adapted = hpvade.metrics.pearson(props, truth)
    assert r_adapted > r_nnls + ADAPT_MARGIN_OVER_NNLS, (r_adapted, r_nnls)
    assert hpvade.metrics.rmse(props, truth) < hpvade.metrics.rmse(nnls, truth.to_numpy())


def test_adaptation_changes_only_the_model_and_keeps_contracts(adapted, trained):
    model, bulk, info = adapted
    assert info["kept"]
    assert model.adaptation_ == info
    S = model.get_signature()
    # adapt's regression output as is: CPM columns up to a few per mille
    np.testing.assert_allclose(S.sum(0), 1e6, rtol=1e-2)
    assert (S.to_numpy() >= 0).all()
    assert not np.allclose(S.to_numpy(), trained.get_signature().to_numpy())
    props = model.get_proportions(bulk)
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-5)


def test_fit_score_flags_samples_the_reference_cannot_explain(trained, pbmc_split):
    """Scenario 5 in small: mixtures rich in a type the reference lacks fit worse."""
    ref, test = pbmc_split
    known = test[test.obs[LABELS] != "CD14+ Monocyte"].copy()
    known.obs[LABELS] = known.obs[LABELS].cat.remove_unused_categories()
    bulk = hpvade.pp.simulate_pseudobulk(test, LABELS, n_pseudobulk=80, seed=5)
    trained.get_proportions(bulk)
    score = bulk.obs["hpvade_fit_score"].to_numpy()
    assert np.isfinite(score).all() and (score >= 0).all()
    monocyte = bulk.obsm["proportions"]["CD14+ Monocyte"].to_numpy()
    # the trained model knows monocytes, so here the score must not track them strongly ...
    explained = np.corrcoef(score, monocyte)[0, 1]
    # ... while a model without monocytes must see them as misfit
    ref_missing = ref[ref.obs[LABELS] != "CD14+ Monocyte"].copy()
    ref_missing.obs[LABELS] = ref_missing.obs[LABELS].cat.remove_unused_categories()
    hpvade.HPVADE.setup_anndata(ref_missing, labels_key=LABELS)
    # seeded: this score depends on the training run (seeds 0-3 gave r 0.78 / 0.19 / 0.80 /
    # 0.67), which issue "Real bulk RNA-seq" is about; here it checks the score, not the run
    scvi.settings.seed = 0
    model = hpvade.HPVADE(ref_missing)
    model.train(max_epochs=30, enable_progress_bar=False)
    model.get_proportions(bulk)
    missing_score = bulk.obs["hpvade_fit_score"].to_numpy()
    unexplained = np.corrcoef(missing_score, monocyte)[0, 1]
    assert unexplained > 0.6, (unexplained, explained)  # measured 0.80
    assert unexplained > explained + 0.3, (unexplained, explained)


def test_weighted_nnls_is_the_exact_weighted_least_squares_fit(pbmc_split):
    S = hpvade.pp.build_signature(pbmc_split[0], LABELS).to_numpy()
    rng = np.random.default_rng(0)
    truth = rng.dirichlet(np.ones(S.shape[1]), 40)
    bulk = truth @ S.T * np.exp(rng.normal(0, 0.3, (40, S.shape[0])))
    weights = rng.uniform(0.1, 3.0, S.shape[0])
    fitted = weighted_nnls(bulk, S, weights)
    root = np.sqrt(weights)
    expected = np.stack([nnls(S * root[:, None], b * root)[0] for b in bulk])
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(fitted, expected, atol=1e-7)
    np.testing.assert_allclose(weighted_nnls(bulk, S, weights, initial=truth), expected, atol=1e-7)
    # weights matter: the unweighted fit is a different answer
    assert np.abs(weighted_nnls(bulk, S, np.ones_like(weights)) - expected).max() > 1e-3


def test_gene_noise_weights_downweight_noisy_genes():
    rng = np.random.default_rng(1)
    fitted = np.full((30, 200), 100.0)
    sd = np.where(np.arange(200) < 100, 1.0, 10.0)  # second half 10x noisier
    bulk = fitted + rng.normal(0, 1, fitted.shape) * sd
    weights = gene_noise_weights(bulk, fitted, n_params=3)
    assert weights.mean() == pytest.approx(1.0)
    quiet, noisy = weights[:100], weights[100:]
    assert quiet.min() > noisy.max()
    # moderated towards the common trend: the ratio stays below the true 100x
    assert 3 < np.median(quiet) / np.median(noisy) < 100


def test_adapted_beats_alternating_nnls_under_sample_variation(trained, pbmc_split, tmp_path):
    """Scenario 6 in small: each sample's genes carry their own multiplicative noise."""
    ref, test = pbmc_split
    bulk = hpvade.pp.simulate_pseudobulk(
        test, LABELS, n_pseudobulk=50, cells_per_pseudobulk=500, seed=3
    )
    rng = np.random.default_rng(3)
    x = np.asarray(bulk.X, dtype=float) * np.exp(rng.normal(0, 0.3, bulk.shape))
    bulk.X = (x / x.sum(1, keepdims=True) * 1e6).astype(np.float32)
    truth = bulk.obsm["proportions"]
    S = hpvade.pp.build_signature(ref, LABELS)
    alternating, _ = hpvade.baselines.adaptive_nnls_proportions(bulk_to_cpm(bulk, S.index), S)
    unadapted = trained.get_proportions(bulk.copy())
    trained.save(tmp_path / "model", overwrite=True)
    model = hpvade.HPVADE.load(tmp_path / "model", adata=trained.adata)
    model.adapt(bulk)
    props = model.get_proportions(bulk)
    r = hpvade.metrics.pearson(props, truth)
    assert r > hpvade.metrics.pearson(alternating, truth.to_numpy()) + (
        ADAPT_MARGIN_OVER_ALTERNATING_NNLS
    )
    assert r > hpvade.metrics.pearson(unadapted, truth) + 0.1
    assert hpvade.metrics.rmse(props, truth) < hpvade.metrics.rmse(unadapted, truth)


def test_adapted_gene_weights_are_saved_and_used(adapted, tmp_path):
    model, bulk, _ = adapted
    weights = model.gene_weights_
    assert weights is not None and weights.shape == (model.adata.n_vars,)
    assert np.all(weights > 0) and weights.mean() == pytest.approx(1.0)
    before = model.get_proportions(bulk.copy())
    model.save(tmp_path / "m", overwrite=True)
    loaded = hpvade.HPVADE.load(tmp_path / "m", adata=model.adata)
    np.testing.assert_allclose(loaded.gene_weights_, weights)
    np.testing.assert_allclose(loaded.get_proportions(bulk.copy()), before, atol=1e-6)
    # the served S is adapt's own array, not its float32 round trip through the module
    assert model.adapted_signature_.dtype == np.float64
    np.testing.assert_array_equal(model.get_signature().to_numpy(), model.adapted_signature_)
    np.testing.assert_array_equal(model.estimator().signature, model.adapted_signature_)
    np.testing.assert_array_equal(loaded.get_signature().to_numpy(), model.adapted_signature_)
    # the weighted fit of an adapted model is the exact weighted least squares with its S
    S = model.get_signature().to_numpy()
    exact = weighted_nnls(bulk_to_cpm(bulk, model.var_names), S, weights)
    np.testing.assert_allclose(before.to_numpy(), exact, atol=1e-6)


def test_flag_after_adapt_spares_a_cohort_the_reference_explains(adapted):
    """The flag is recalibrated for the adapted fit without the unadapted half-split factor.
    Measured: this cohort 0 % flagged (1.7 % with the factor); the demo's 300 clean
    pseudobulks after a 20-epoch model 0 % (16 % with the factor)."""
    model, bulk, _ = adapted
    fresh = bulk.copy()
    model.get_proportions(fresh)
    assert fresh.obs["hpvade_unexplained"].mean() <= 0.05


def test_adapt_takes_a_bulk_that_lacks_some_genes_as_get_proportions_does(pbmc_split):
    import warnings

    from .conftest import train_briefly

    model = train_briefly(pbmc_split[0].copy(), max_epochs=5)
    bulk = hpvade.pp.simulate_pseudobulk(pbmc_split[1], LABELS, n_pseudobulk=60, seed=3)
    kept = np.ones(len(model.var_names), dtype=bool)
    kept[::10] = False  # every tenth gene missing from the bulk
    lacking = bulk[:, model.var_names[kept]].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = model.adapt(lacking)
    assert summary["n_genes_adapted"] == int(kept.sum())
    assert summary["kept"], summary
    if summary["kept"]:
        reference = model.reference_signature_
        np.testing.assert_array_equal(model.adapted_signature_[~kept], reference[~kept])
        assert np.all(model.gene_weights_[~kept] == 0)
    props = model.get_proportions(lacking.copy())
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
