"""HPVADE end to end: setup, training, scale check, proportions, getters, save/load."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import hpvade
from hpvade import NonFiniteLossError, ScaleMismatchError

from .conftest import LABELS, make_reference


def _quiet_train(model, **kwargs):
    kwargs.setdefault("enable_progress_bar", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|logging interval).*")
        model.train(**kwargs)


def test_initial_signature_is_build_signature(pbmc_split):
    ref = pbmc_split[0].copy()
    hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS)
    model = hpvade.HPVADE(ref)
    S = model.get_signature()
    expected = hpvade.pp.build_signature(ref, LABELS)
    np.testing.assert_allclose(S.sum(0), 1e6, rtol=1e-4)
    assert list(S.columns) == list(expected.columns)
    assert np.corrcoef(S.to_numpy().ravel(), expected.to_numpy().ravel())[0, 1] > 0.999


def test_scale_check_recorded_and_in_range(trained):
    check = trained.scale_check_
    assert 0.5 <= check["scale_ratio"] <= 2.0
    assert check["scale_bulk"] == pytest.approx(1e6 / trained.summary_stats.n_vars, rel=1e-3)
    history = trained.history
    assert "scale_ratio" in history
    assert 0.5 <= float(history["scale_ratio"].iloc[0, 0]) <= 2.0
    for term in ["prototype_loss_train", "bulk_loss_train", "proportion_loss_train"]:
        assert term in history and np.isfinite(history[term].to_numpy(float)).all()
    assert "bulk_loss_validation" in history


def test_proportions_contract(trained, test_bulk):
    bulk = test_bulk.copy()
    props = trained.get_proportions(bulk)
    assert list(props.index) == list(bulk.obs_names)
    assert list(props.columns) == list(trained.cell_types)
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-5)
    assert (props.to_numpy() >= 0).all()
    pd.testing.assert_frame_equal(bulk.obsm["hpvade_proportions"], props)
    r = hpvade.metrics.pearson(props, bulk.obsm["proportions"])
    assert r > 0.55  # a 60-epoch model on held-out cells; the demo reports the full figure


def test_raw_counts_and_cpm_give_same_proportions(trained, test_bulk):
    bulk = test_bulk.copy()
    rng = np.random.default_rng(0)
    depth = rng.uniform(1e6, 3e7, size=(bulk.n_obs, 1))
    counts = bulk.copy()
    counts.X = np.round(bulk.X / 1e6 * depth).astype(np.float32)
    cpm = counts.copy()
    cpm.X = counts.X / counts.X.sum(1, keepdims=True) * 1e6
    a = trained.get_proportions(counts)
    b = trained.get_proportions(cpm)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-5)


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def _quiet_flag(call, *args, **kwargs):
    """``call`` with the unexplained-sample flag's warning silenced, others kept."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not explained by the reference")
        return call(*args, **kwargs)


def test_log_bulk_is_refused(trained, test_bulk):
    logged = test_bulk.copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(ValueError, match="looks log-transformed.*pass raw counts, CPM or TPM"):
        trained.get_proportions(logged)
    assert "hpvade_proportions" not in logged.obsm


def test_bulk_lacking_genes_is_fitted_on_the_rest(trained, test_bulk):
    full = test_bulk.copy()
    expected = _quiet(trained.get_proportions, full).to_numpy()
    selected = pd.Index(trained.selected_genes_)
    # a few selected genes missing: fitted on the rest, no warning, the report names them
    few = test_bulk[:, ~test_bulk.var_names.isin(selected[:3])].copy()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lacks.*selected genes")
        got = _quiet_flag(trained.get_proportions, few).to_numpy()
    assert np.abs(got - expected).mean() < 0.01
    report = few.uns["hpvade_gene_report"]
    assert sorted(report["selected_missing"]) == sorted(selected[:3])
    assert len(report["used_genes"]) == len(selected) - 3
    assert few.obs["hpvade_unknown_lower_bound"].between(0, 1).all()
    # a fifth missing: still fitted, with a warning naming the count
    many = test_bulk[:, ~test_bulk.var_names.isin(selected[::5])].copy()
    n_missing = len(selected[::5])
    with pytest.warns(UserWarning, match=rf"lacks {n_missing} of the model's {len(selected)}"):
        got = trained.get_proportions(many).to_numpy()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9
    # too few left: an error that says how many are needed
    none = test_bulk[:, ~test_bulk.var_names.isin(selected)].copy()
    with pytest.raises(ValueError, match=r"has 0 of the model's .* selected genes; at least"):
        trained.get_proportions(none)


def test_model_without_gene_selection_fits_every_gene_the_bulk_has(
    trained, test_bulk, monkeypatch
):
    # a model saved before gene selection has no selected genes: every gene is fitted
    monkeypatch.setattr(trained, "selected_genes_", None)
    expected = _quiet_flag(trained.get_proportions, test_bulk.copy()).to_numpy()
    few = test_bulk[:, 5:].copy()
    got = _quiet_flag(trained.get_proportions, few).to_numpy()
    report = few.uns["hpvade_gene_report"]
    assert len(report["missing_genes"]) == 5 and "used_genes" not in report
    assert np.abs(got - expected).mean() < 0.01


def test_extra_and_reordered_bulk_genes_are_matched_by_name(trained, test_bulk):
    bulk = test_bulk.copy()
    expected = trained.get_proportions(bulk)
    extra = np.full((bulk.n_obs, 3), 50.0, dtype=np.float32)
    import anndata as ad

    shuffled = ad.concat(
        [bulk, ad.AnnData(extra, obs=bulk.obs, var=pd.DataFrame(index=["x1", "x2", "x3"]))],
        axis=1,
    )
    shuffled = shuffled[:, np.random.default_rng(0).permutation(shuffled.n_vars)].copy()
    got = trained.get_proportions(shuffled)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-5)


def test_latent_and_signature_getters(trained):
    z = trained.get_latent_representation()
    assert z.shape == (trained.adata.n_obs, 32)
    assert np.isfinite(z).all()
    S = trained.get_signature()
    np.testing.assert_allclose(S.sum(0), 1e6, rtol=1e-4)
    assert (S.to_numpy() >= 0).all()


def test_untrained_model_refuses_proportions(pbmc_split, test_bulk):
    ref = pbmc_split[0].copy()
    hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS)
    model = hpvade.HPVADE(ref)
    with pytest.raises(RuntimeError, match=r"not trained yet.*model\.train\(\)"):
        model.get_proportions(test_bulk.copy())


def test_save_load_roundtrip(trained, test_bulk, tmp_path):
    trained.save(tmp_path / "model", overwrite=True)
    loaded = hpvade.HPVADE.load(tmp_path / "model", adata=trained.adata)
    a = trained.get_proportions(test_bulk.copy())
    b = loaded.get_proportions(test_bulk.copy())
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-6)
    pd.testing.assert_frame_equal(trained.get_signature(), loaded.get_signature())
    assert loaded.scale_check_ == trained.scale_check_
    no_data = hpvade.HPVADE.load(tmp_path / "model")
    np.testing.assert_allclose(
        no_data.get_proportions(test_bulk.copy()).to_numpy(), a.to_numpy(), atol=1e-6
    )


def _pool(adata, factor):
    """A training pool of pseudobulks, CPM times ``factor``, as the plan takes it."""
    pb = hpvade.pp.simulate_pseudobulk(adata, "cell_type", n_pseudobulk=64, seed=0)
    cpm = torch.as_tensor(pb.X * factor, dtype=torch.float32)
    return cpm, torch.as_tensor(pb.obsm["proportions"].to_numpy(), dtype=torch.float32)


def test_mis_scaled_bulk_is_seen_on_the_first_batch():
    """Failure mode 4: a bulk 100x off the reconstruction's scale warns, or raises if strict."""
    adata = make_reference()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type")
    model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
    plan_kwargs = {"pseudobulk_train": _pool(adata, 100)}
    with pytest.warns(UserWarning, match=r"SEVERE.*scale_ratio 100"):
        _quiet_train(model, max_epochs=1, n_pseudobulk=64, plan_kwargs=plan_kwargs)
    assert model.scale_check_["scale_ratio"] == pytest.approx(100, rel=1e-3)
    with pytest.raises(ScaleMismatchError, match="different scales"):
        _quiet_train(
            model, max_epochs=1, n_pseudobulk=64, strict_scale_check=True, plan_kwargs=plan_kwargs
        )


def test_moderate_scale_gap_warns_without_severe():
    adata = make_reference()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type")
    model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
    plan_kwargs = {"pseudobulk_train": _pool(adata, 3)}
    with pytest.warns(UserWarning, match=r"^Bulk and reconstructed bulk.*scale_ratio 3"):
        _quiet_train(model, max_epochs=1, n_pseudobulk=64, plan_kwargs=plan_kwargs)


def _small_model_with_a_nan_in_s():
    """A small registered reference and its model, one entry of S NaN: training must stop."""
    adata = make_reference()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type")
    model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
    with torch.no_grad():
        model.module.signature_logits[0, 0] = float("nan")
    return adata, model


def test_nan_loss_stops_training_naming_the_term():
    _, model = _small_model_with_a_nan_in_s()
    with pytest.raises(NonFiniteLossError, match=r"Non-finite prototype_loss .* step 0"):
        _quiet_train(model, max_epochs=2, n_pseudobulk=64)


@pytest.fixture
def one_thread():
    """Multi-threaded CPU kernels add run-to-run rounding (README); one thread is exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seed_makes_training_reproducible(test_bulk, one_thread):
    adata = make_reference()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type")
    results = []
    for _ in range(2):
        scvi.settings.seed = 7
        model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
        _quiet_train(model, max_epochs=3, n_pseudobulk=64)
        results.append(model.get_signature().to_numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_same_seed_gives_identical_proportions(test_bulk, one_thread):
    adata = make_reference()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type")
    bulk = hpvade.pp.simulate_pseudobulk(adata, "cell_type", n_pseudobulk=10, seed=3)
    results = []
    for _ in range(2):
        scvi.settings.seed = 11
        model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
        _quiet_train(model, max_epochs=3, n_pseudobulk=64)
        results.append(model.get_proportions(bulk.copy()).to_numpy())
    np.testing.assert_array_equal(results[0], results[1])


def test_interrupted_run_saves_and_loads(tmp_path):
    adata, model = _small_model_with_a_nan_in_s()
    with pytest.raises(NonFiniteLossError):
        _quiet_train(model, max_epochs=2, n_pseudobulk=64)
    model.save(tmp_path / "interrupted")
    loaded = hpvade.HPVADE.load(tmp_path / "interrupted", adata=adata)
    assert not loaded.is_trained
    assert loaded.get_signature().shape == (adata.n_vars, 3)


def test_a_deferred_finite_check_names_the_first_failing_step(monkeypatch):
    """As on an accelerator: steps queue unchecked; the check names the first failing one."""
    from hpvade.train import HPVADETrainingPlan

    queued = []
    check = HPVADETrainingPlan._raise_if_not_finite

    def spy(self):
        queued.append([terms for *_, terms in self._pending_losses])
        check(self)

    monkeypatch.setattr(HPVADETrainingPlan, "_raise_if_not_finite", spy)
    _, model = _small_model_with_a_nan_in_s()
    with pytest.raises(NonFiniteLossError, match=r"Non-finite prototype_loss .* step 0"):
        _quiet_train(model, max_epochs=20, n_pseudobulk=64, plan_kwargs={"finite_check_every": 3})
    assert len(queued) == 1 and 1 < len(queued[0]) <= 3  # at 3 steps or the epoch end
    assert all(v.grad_fn is None for terms in queued[0] for v in terms.values())


def test_absurd_learning_rate_stops_with_a_named_term():
    adata = make_reference()
    hpvade.HPVADE.setup_anndata(adata, labels_key="cell_type")
    model = hpvade.HPVADE(adata, n_hidden=16, n_latent=4)
    with pytest.raises(NonFiniteLossError, match=r"Non-finite \w+ .* step \d+.*learning rate"):
        _quiet_train(model, max_epochs=30, n_pseudobulk=64, plan_kwargs={"lr": 1e3})


def test_view_anndata_setup_works_with_current_rich(trained, capsys):
    """scvi-tools 1.4.2 uses rich.pretty without importing it (issue "First contact" 1)."""
    trained.view_anndata_setup()
    assert "bulk_labels" in capsys.readouterr().out


def test_the_vae_models_a_subset_of_a_wide_reference_and_loads_without_data(
    pbmc_split, test_bulk, tmp_path
):
    ref = pbmc_split[0].copy()
    scvi.settings.seed = 0
    hpvade.HPVADE.setup_anndata(ref, labels_key="bulk_labels")
    model = hpvade.HPVADE(ref, vae_genes=300)
    index = model.module.vae_gene_index.numpy()
    assert index.size == 300 and np.all(np.diff(index) > 0)
    # the markers come first, then the genes whose log1p values vary most
    chosen = set(model.var_names[index])
    markers = set(model.selected_genes_)
    assert chosen <= markers if len(markers) >= 300 else markers <= chosen
    assert model.module.encoder.encoder.fc_layers[0][0].in_features == 300
    assert model.module.deconv_net.fc_layers[0][0].in_features == 300
    assert model.module.signature().shape == (ref.n_vars, 10)  # S keeps every gene
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=5, enable_progress_bar=False)
        expression = model.get_cell_type_expression(test_bulk.copy())
        ratios = model.signature_draws(3)
    frame = expression[model.cell_types[0]]
    assert frame.shape[1] == ref.n_vars
    np.testing.assert_allclose(frame.sum(axis=1)[frame.sum(axis=1) > 0], 1e6, rtol=1e-6)
    assert ratios.shape == (3, ref.n_vars, 10)
    outside = np.setdiff1d(np.arange(ref.n_vars), index)
    assert np.all(ratios[:, outside] == 1.0) and not np.allclose(ratios[:, index], 1.0)
    props = model.get_proportions(test_bulk.copy())
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
    model.adapt(test_bulk.copy())  # the network's fine-tuning reads its genes of the full CPM
    model.save(tmp_path / "wide", overwrite=True)
    loaded = hpvade.HPVADE.load(tmp_path / "wide")  # no data: the genes come with the model
    np.testing.assert_array_equal(loaded.module.vae_gene_index.numpy(), index)
    with pytest.raises(ValueError, match="vae_genes.*got 'some'"):
        hpvade.HPVADE(ref, vae_genes="some")


def test_a_reference_of_up_to_8000_genes_keeps_every_gene_in_the_vae(trained):
    assert trained.module.vae_gene_index is None
    assert trained.module.n_vae_genes == len(trained.var_names)


def test_a_trained_and_used_model_holds_no_graph_and_deep_copies(pbmc_split, test_bulk):
    import copy
    import gc

    ref = pbmc_split[0].copy()
    scvi.settings.seed = 0
    hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS)
    model = hpvade.HPVADE(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no validation: the last step of training is a training step
        model.train(max_epochs=2, train_size=1.0, enable_progress_bar=False)
    model.get_proportions(test_bulk.copy())
    seen, queue, with_graph = set(), [model], []
    while queue and len(seen) < 200_000:  # every object reachable from the model
        obj = queue.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
            with_graph.append(obj)
        queue.extend(gc.get_referents(obj))
    assert not with_graph, [t.grad_fn for t in with_graph[:3]]
    clone = copy.deepcopy(model)
    np.testing.assert_array_equal(
        clone.get_proportions(test_bulk.copy()).to_numpy(),
        model.get_proportions(test_bulk.copy()).to_numpy(),
    )


def test_the_vae_takes_the_markers_then_the_most_variable_other_genes():
    from hpvade.data._genes import resolve_vae_genes

    names = pd.Index([f"g{i}" for i in range(10)])
    ranked = np.array([9, 2, 8, 1, 7, 0, 3, 4, 5, 6])  # most variable first
    chosen = resolve_vae_genes(4, names, lambda n: ranked[:n], pd.Index(["g2", "g5"]))
    # markers g2 and g5, then the most variable others: g9 (g2 is a marker), g8
    np.testing.assert_array_equal(chosen, [2, 5, 8, 9])
    assert resolve_vae_genes("auto", names, lambda n: ranked[:n], pd.Index([])) is None
    # variable_genes ranks the genes by their variance, most variable first
    import anndata as ad
    import scipy.sparse as sp

    from hpvade.data._genes import variable_genes

    values = np.random.default_rng(0).normal(size=(50, 4)) * np.array([1.0, 4.0, 0.5, 2.0])
    cells = ad.AnnData(sp.csr_matrix(np.abs(values)))
    np.testing.assert_array_equal(variable_genes(cells, None, 3), [1, 3, 0])


def test_tl_markers_are_the_genes_the_model_fits_on(pbmc):
    """One word, one thing: ``tl.markers`` is what ``HPVADE(genes="markers")`` selects."""
    ref = pbmc.copy()
    hpvade.HPVADE.setup_anndata(ref, labels_key="bulk_labels")
    model = hpvade.HPVADE(ref)
    found = hpvade.tl.markers(ref, "bulk_labels")
    assert list(found.index) == list(model.selected_genes_)


def test_costly_steps_show_progress_where_a_bar_redraws(trained, monkeypatch):
    """Calibration, signature draws and the cell states show a bar in a terminal or notebook
    (none in a log file, where ``interactive_output`` is False)."""
    import copy

    import scvi.utils

    import hpvade._logging

    bars = []

    def recording_track(sequence, description, total=None, **kwargs):
        bars.append(description)
        return sequence

    monkeypatch.setattr(scvi.utils, "track", recording_track)
    model = copy.deepcopy(trained)
    monkeypatch.setattr(hpvade._logging, "interactive_output", lambda: False)
    model.calibrate_uncertainty(n_draws=2, n_pseudobulk=20)
    assert bars == []
    monkeypatch.setattr(hpvade._logging, "interactive_output", lambda: True)
    model.signature_ratios_ = None  # drawn again
    model.calibrate_uncertainty(n_draws=2, n_pseudobulk=20)
    model.cell_states_ = None
    model.cell_states()
    assert bars == ["Calibrating", "Drawing signatures", "Cell states"], bars
    # a train asked for no bar calibrates without one too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, enable_progress_bar=False)
    assert bars == ["Calibrating", "Drawing signatures", "Cell states"], bars
