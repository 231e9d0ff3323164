"""Bad input gets a clear error (type and message), and user data is left as it was."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hpvade

from .conftest import make_reference


def _setup(adata, **kwargs):
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type", **kwargs)


def test_duplicate_gene_and_cell_names_are_refused():
    adata = make_reference()
    adata.var_names = ["gene0"] + list(adata.var_names[1:-1]) + ["gene0"]
    with pytest.raises(ValueError, match=r"var_names are not unique.*var_names_make_unique"):
        _setup(adata)
    adata = make_reference()
    adata.obs_names = ["cell0"] * 2 + list(adata.obs_names[2:])
    with pytest.raises(ValueError, match=r"obs_names are not unique.*obs_names_make_unique"):
        _setup(adata)


def test_missing_nan_empty_and_single_type_labels_are_refused():
    adata = make_reference()
    with pytest.raises(KeyError, match="labels_key 'nope' is not a column"):
        hpvade.HPVADE.setup_anndata(adata, labels_key="nope")
    nan = make_reference()
    nan.obs["cell_type"] = nan.obs["cell_type"].cat.add_categories(["x"])
    nan.obs.loc[nan.obs_names[5], "cell_type"] = np.nan
    with pytest.raises(ValueError, match=r"1 cells have a missing label.*notna"):
        _setup(nan)
    with pytest.raises(ValueError, match=r"\['x'\].*have no cells.*remove_unused_categories"):
        _setup(_with_empty_category())
    one = make_reference(n_types=1)
    with pytest.raises(ValueError, match="at least two cell types"):
        _setup(one)


def _with_empty_category():
    adata = make_reference()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["x"])
    return adata


def test_bad_values_in_x_are_refused():
    neg = make_reference(sparse=False)
    neg.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative values.*log1p-normalised"):
        _setup(neg)
    nan = make_reference(sparse=False)
    nan.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        _setup(nan)
    counts = make_reference()
    counts.X = counts.layers["counts"].copy()
    with pytest.raises(ValueError, match="looks like raw counts.*counts_layer='counts'"):
        _setup(counts)
    with pytest.raises(ValueError, match="looks like raw counts"):
        hpvade.pp.build_signature(counts, "cell_type")
    not_logged = make_reference(sparse=False)
    not_logged.X = np.expm1(not_logged.X) * 100  # normalised to 1e6 per cell, not logged
    with pytest.raises(ValueError, match="normalised but not log-transformed.*log1p"):
        _setup(not_logged)
    with pytest.raises(ValueError, match="normalised but not log-transformed"):
        hpvade.pp.build_signature(not_logged, "cell_type")


def test_counts_in_x_with_log_values_in_a_layer():
    """scvi-tools style: X holds counts, `layer=` names the log1p values; S comes out finite."""
    adata = make_reference()
    adata.layers["log1p"] = adata.X.copy()
    adata.X = adata.layers["counts"].copy()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type", layer="log1p")
    signature = hpvade.HPVADE(adata, n_hidden=16, n_latent=4).get_signature()
    expected = hpvade.pp.build_signature(adata, "cell_type", layer="log1p")
    assert np.isfinite(signature.to_numpy()).all()
    assert np.corrcoef(signature.to_numpy().ravel(), expected.to_numpy().ravel())[0, 1] > 0.999


def test_single_cell_types_zero_genes_and_zero_cells_warn():
    adata = make_reference(sparse=False)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["lonely"])
    adata.obs.loc[adata.obs_names[10], "cell_type"] = "lonely"
    adata.X[:, 3] = 0
    adata.X[20] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _setup(adata)
    messages = " | ".join(str(w.message) for w in caught)
    assert "['lonely'] have a single reference cell" in messages
    assert "1 of 60 genes are zero in every reference cell" in messages
    assert "1 reference cells have zero counts" in messages


@pytest.mark.parametrize("kind", ["int", "float16", "csr", "csc", "dense"])
def test_bulk_matrix_types_give_the_same_proportions(trained, test_bulk, kind):
    # integer counts at 50,000 reads a sample, within float16's range (max 65,504)
    counts = np.round(np.asarray(test_bulk.X, dtype=np.float64) * 0.05)
    expected = trained.get_proportions(ad.AnnData(counts.astype(np.float64), var=test_bulk.var))
    x = {
        "int": counts.astype(np.int64),
        "float16": counts.astype(np.float16),
        "csr": sp.csr_matrix(counts),
        "csc": sp.csc_matrix(counts),
        "dense": counts.astype(np.float32),
    }[kind]
    got = trained.get_proportions(ad.AnnData(x, var=test_bulk.var))
    atol = 2e-3 if kind == "float16" else 1e-5  # float16 rounds counts above 2,048
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=atol)


def test_bad_bulks_are_refused(trained, test_bulk):
    cases = {
        "NaN or infinite": lambda x: x.__setitem__((0, 0), np.nan),
        "negative values": lambda x: x.__setitem__((0, 0), -5.0),
        "1 bulk samples have no counts": lambda x: x.__setitem__(0, 0.0),
    }
    for message, corrupt in cases.items():
        x = np.asarray(test_bulk.X, dtype=np.float64).copy()
        corrupt(x)
        with pytest.raises(ValueError, match=message):
            trained.get_proportions(ad.AnnData(x, var=test_bulk.var))
    dup = ad.AnnData(np.asarray(test_bulk.X), var=pd.DataFrame(index=test_bulk.var_names))
    dup.var_names = [dup.var_names[1]] + list(dup.var_names[1:])
    with pytest.raises(ValueError, match="Bulk var_names are not unique"):
        trained.get_proportions(dup)


def test_public_calls_change_only_documented_keys(pbmc_split, trained, test_bulk):
    ref = pbmc_split[0].copy()
    before = ref.copy()
    hpvade.pp.build_signature(ref, "bulk_labels")
    hpvade.pp.simulate_pseudobulk(ref, "bulk_labels", n_pseudobulk=5)
    assert _same(ref, before)

    bulk = test_bulk.copy()
    snapshot = bulk.copy()
    trained.get_proportions(bulk)
    assert set(bulk.obsm) - set(snapshot.obsm) == {"hpvade_proportions"}
    written = {
        "hpvade_fit_score",
        "hpvade_unexplained_score",
        "hpvade_unexplained",
        "hpvade_unknown_fraction",
        "hpvade_unknown_lower_bound",
    }
    assert set(bulk.obs.columns) - set(snapshot.obs.columns) == written
    assert set(bulk.uns) - set(snapshot.uns) == {"hpvade_gene_report", "hpvade_estimator"}
    del bulk.obsm["hpvade_proportions"], bulk.uns["hpvade_gene_report"]
    del bulk.uns["hpvade_estimator"]
    bulk.obs = bulk.obs.drop(columns=list(written))
    assert _same(bulk, snapshot)

    adapted = hpvade.HPVADE.load(_saved(trained), adata=trained.adata)
    bulk = test_bulk[:20].copy()
    snapshot = bulk.copy()
    adapted.adapt(bulk, max_iterations=3)
    assert _same(bulk, snapshot)  # adapt writes nothing on the bulk
    with pytest.warns(FutureWarning, match="`n_rounds` was renamed `max_iterations`"):
        summary = adapted.adapt(bulk, n_rounds=2)
    assert summary["max_iterations"] == 2 and summary["n_iterations_run"] <= 2
    # a summary saved before 0.3 names it n_rounds: the recalibrations still read it
    adapted.adaptation_["n_rounds"] = adapted.adaptation_.pop("max_iterations")
    assert adapted.calibrate_uncertainty(n_draws=2, n_pseudobulk=20) is not None

    registered = pbmc_split[0].copy()
    snapshot = registered.copy()
    hpvade.HPVADE.setup_anndata(registered, labels_key="bulk_labels")
    new_obs = set(registered.obs.columns) - set(snapshot.obs.columns)
    assert new_obs <= {"_scvi_labels"}  # scvi-tools' registry column
    np.testing.assert_array_equal(registered.X.toarray(), snapshot.X.toarray())

    after_setup = registered.copy()
    model = hpvade.HPVADE(registered, n_hidden=16, n_latent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=2, n_pseudobulk=32, enable_progress_bar=False)
    model.get_latent_representation()
    model.get_signature()
    assert _same(registered, after_setup)


def _saved(model):
    import tempfile

    path = tempfile.mkdtemp()
    model.save(path, overwrite=True)
    return path


def _same(a, b) -> bool:
    x_a = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    x_b = b.X.toarray() if sp.issparse(b.X) else np.asarray(b.X)
    return (
        np.array_equal(x_a, x_b)
        and a.obs.equals(b.obs)
        and a.var.equals(b.var)
        and set(a.obsm) == set(b.obsm)
        and set(a.layers) == set(b.layers)
        and set(a.uns) == set(b.uns)
    )


def test_views_are_refused_with_the_fix(trained, test_bulk):
    view = make_reference()[:150]
    with pytest.raises(ValueError, match=r"a view cannot hold.*\.copy\(\)"):
        _setup(view)
    with pytest.raises(ValueError, match=r"`bulk` is a view.*\.copy\(\)"):
        trained.get_proportions(test_bulk[:10])


def test_load_with_other_genes_or_labels_is_refused(tmp_path):
    adata = make_reference()
    _setup(adata)
    model = hpvade.HPVADE(adata, n_hidden=8, n_latent=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, n_pseudobulk=32, enable_progress_bar=False)
    model.save(tmp_path / "m")
    fewer = make_reference()[:, :50].copy()
    with pytest.raises(
        ValueError, match=r"genes differ.*10 missing.*align it first.*load_registry"
    ):
        hpvade.HPVADE.load(tmp_path / "m", adata=fewer)
    relabelled = make_reference()
    relabelled.obs["cell_type"] = relabelled.obs["cell_type"].cat.rename_categories(
        {"type0": "other"}
    )
    with pytest.raises(ValueError, match=r"does not know: \['other'\]"):
        hpvade.HPVADE.load(tmp_path / "m", adata=relabelled)
    loaded = hpvade.HPVADE.load(tmp_path / "m", adata=make_reference())
    assert list(loaded.cell_types) == ["type0", "type1", "type2"]


@pytest.mark.parametrize("function", ["build_signature", "simulate_pseudobulk"])
def test_pp_functions_validate_their_input(function):
    call = getattr(hpvade.pp, function)
    bad = make_reference(sparse=False)
    bad.X[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(bad, "cell_type")
    bad_counts = make_reference(sparse=False)
    bad_counts.layers["counts"][0, 0] = -1
    with pytest.raises(ValueError, match=r"layers\['counts'\].*non-negative"):
        call(bad_counts, "cell_type", counts_layer="counts")
    with pytest.raises(KeyError, match="labels_key 'cell' is not a column"):
        call(make_reference(), "cell")
    dup = make_reference()
    dup.var_names = ["g"] * dup.n_vars
    with pytest.raises(ValueError, match="var_names are not unique"):
        call(dup, "cell_type")


def test_renamed_keywords_keep_working_with_a_future_warning(pbmc):
    new = hpvade.pp.simulate_pseudobulk(
        pbmc, "bulk_labels", n_pseudobulk=4, cells_per_pseudobulk=50, dirichlet_alpha=0.5
    )
    with pytest.warns(FutureWarning, match="`n_samples` was renamed `n_pseudobulk`"):
        old = hpvade.pp.simulate_pseudobulk(
            pbmc, "bulk_labels", n_samples=4, cells_per_sample=50, alpha=0.5
        )
    np.testing.assert_array_equal(old.X, new.X)
    with pytest.raises(TypeError, match="both `n_samples` and its new name"):
        hpvade.pp.simulate_pseudobulk(pbmc, "bulk_labels", n_samples=4, n_pseudobulk=4)
    signature = hpvade.pp.build_signature(pbmc, "bulk_labels")
    with pytest.warns(FutureWarning, match="moved to `hpvade.tl.signature_markers`"):
        markers = hpvade.pl.marker_genes(signature, 2)
    assert len(markers) == 2 * pbmc.obs["bulk_labels"].nunique()
    with pytest.warns(FutureWarning, match="renamed `hpvade.tl.signature_markers`"):
        pd.testing.assert_series_equal(hpvade.tl.marker_genes(signature, 2), markers)


def test_counts_layer_replaces_counts_flag():
    adata = make_reference()
    new = hpvade.pp.build_signature(adata, "cell_type", counts_layer="counts")
    with pytest.warns(FutureWarning, match="`counts=True` was replaced by `counts_layer=`"):
        old = hpvade.pp.build_signature(adata, "cell_type", layer="counts", counts=True)
    pd.testing.assert_frame_equal(old, new)


def test_bulk_as_dataframe_or_array(trained, test_bulk):
    """A samples × genes table works like the AnnData; an array is refused with the fix."""
    table = pd.DataFrame(test_bulk.X, index=test_bulk.obs_names, columns=test_bulk.var_names)
    from_table = trained.get_proportions(table.iloc[:, ::-1])  # gene order does not matter
    from_anndata = trained.get_proportions(test_bulk.copy())
    np.testing.assert_allclose(from_table.to_numpy(), from_anndata.to_numpy(), atol=1e-6)
    assert list(from_table.index) == list(test_bulk.obs_names)
    with pytest.raises(TypeError, match=r"AnnData or a pandas DataFrame.*anndata.AnnData\(values"):
        trained.get_proportions(np.asarray(test_bulk.X))


def test_adapt_says_how_many_samples_it_needs(trained, test_bulk):
    with pytest.raises(ValueError, match="adapt needs at least 3 bulk samples, got 1"):
        trained.adapt(test_bulk[:1].copy())
    assert trained.adaptation_ is None  # refused before anything changed


def test_integer_label_codes_warn_and_become_strings_everywhere():
    adata = make_reference()
    adata.obs["code"] = adata.obs["cell_type"].cat.codes.astype(int)
    with pytest.warns(UserWarning, match=r"holds numbers \(\[0, 1, 2\]\).*look like"):
        signature = hpvade.pp.build_signature(adata, "code")
    with pytest.warns(UserWarning, match="look like cluster or label codes"):
        hpvade.HPVADE.setup_anndata(adata, labels_key="code")
    model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
    assert list(model.cell_types) == list(signature.columns) == ["0", "1", "2"]
    assert list(model.get_signature().columns) == ["0", "1", "2"]


def test_a_transposed_bulk_or_other_gene_identifiers_are_named(trained, test_bulk):
    bulk = test_bulk[:8].copy()
    table = pd.DataFrame(bulk.X, bulk.obs_names, bulk.var_names)
    with pytest.raises(ValueError, match="looks transposed.*genes as columns"):
        trained.get_proportions(table.T)
    ensembl = table.copy()
    ensembl.columns = [f"ENSG{i:011d}" for i in range(table.shape[1])]
    with pytest.raises(ValueError, match="bulk's genes are Ensembl IDs.*reference's gene symbols"):
        trained.get_proportions(ensembl)
    lower = table.copy()
    lower.columns = table.columns.str.lower()
    with pytest.raises(ValueError, match=r"another case \(e.g. 'hes4' for 'HES4'\).*upper"):
        trained.get_proportions(lower)
    # each names the genes' fix, not the samples' (they have counts, on genes named otherwise)
    for bad in (table.T, ensembl, lower):
        with pytest.raises(ValueError) as error:
            trained.get_proportions(bad)
        assert "remove them" not in str(error.value)
        assert "The model's genes are e.g." in str(error.value)
    versioned = _ensembl_model_bulk(table)
    message = hpvade.data._bulk.gene_mismatch_hint(*versioned)
    assert "strip the version suffix" in message
    assert hpvade.data._bulk.gene_mismatch_hint(ad.AnnData(table), trained.var_names) == ""


def _ensembl_model_bulk(table):
    ids = pd.Index([f"ENSG{i:011d}" for i in range(table.shape[1])])
    bulk = ad.AnnData(table.to_numpy(), var=pd.DataFrame(index=ids + ".7"))
    return bulk, ids


def test_fit_proportions_without_a_model_checks_a_bulk_as_the_model_does(pbmc, test_bulk):
    """One preparation of a bulk: ``tl.fit_proportions`` names the gene fix as
    ``get_proportions`` does, and fits a view (it writes nothing)."""
    signature = hpvade.pp.build_signature(pbmc, "bulk_labels")
    table = pd.DataFrame(test_bulk.X[:8], test_bulk.obs_names[:8], test_bulk.var_names)
    lower = table.copy()
    lower.columns = table.columns.str.lower()
    with pytest.raises(ValueError, match=r"another case \(e.g. 'hes4' for 'HES4'\).*upper"):
        hpvade.tl.fit_proportions(lower, signature)
    view = test_bulk[:8]
    fitted = hpvade.tl.fit_proportions(view, signature)
    np.testing.assert_allclose(fitted.sum(axis=1), 1.0)
