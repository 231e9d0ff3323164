"""Each sample's cell-type-specific expression (``get_cell_type_expression``)."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hpvade

from .conftest import train_briefly


def test_expression_shapes_and_scales(trained, test_bulk):
    bulk = test_bulk.copy()
    before = (bulk.X.copy(), dict(bulk.obsm), dict(bulk.uns))
    expression = trained.get_cell_type_expression(bulk)
    mixture = trained.get_proportions(bulk.copy(), kind="rna")
    assert list(expression) == list(trained.cell_types)
    for name, frame in expression.items():
        assert frame.shape == (bulk.n_obs, trained.adata.n_vars)
        assert list(frame.index) == list(bulk.obs_names)
        values = frame.to_numpy()
        assert np.all(values >= 0)
        # CPM where the type is present, zeros where its share is 0
        expected = np.where(mixture[name].to_numpy() > 0, 1e6, 0.0)
        np.testing.assert_allclose(values.sum(axis=1), expected, rtol=1e-6)
        assert (expected > 0).mean() > 0.5
    one = trained.get_scale_for_ct(bulk, trained.cell_types[2])
    pd.testing.assert_frame_equal(one, expression[trained.cell_types[2]])
    # a getter: the user's bulk is untouched
    np.testing.assert_array_equal(bulk.X, before[0])
    assert set(bulk.obsm) == set(before[1]) and set(bulk.uns) == set(before[2])


def test_unknown_cell_type_names_the_types(trained, test_bulk):
    with pytest.raises(ValueError, match="Unknown cell type 'Neutrophil'.*model's types"):
        trained.get_scale_for_ct(test_bulk, "Neutrophil")


def _state_shift_data(seed=0, n_genes=200, n_bulks=80, control_only=False, donor_shift=1.0):
    """Three types; in types 0 and 1 half the reference cells are 'stimulated' (genes 0-9 up
    in both, 10-19 only in type 0, 20-29 only in type 1). Bulks mix the types with each
    type's own stimulated share; truth is each type's expected profile in the sample.
    ``control_only``: the reference's stimulated cells are left out. ``donor_shift``: the
    bulks' donor has genes 40-59 of type 0 this many times the reference's, in both states."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=(3, n_genes)) + 0.02
    stim = base.copy()
    stim[0, :20] *= 8
    stim[1, :10] *= 8
    stim[1, 20:30] *= 8
    base /= base.sum(1, keepdims=True)
    stim /= stim.sum(1, keepdims=True)
    n_cells = 900
    types = np.arange(n_cells) % 3
    stimulated = (np.arange(n_cells) // 3) % 2 == 1
    profile = np.where(stimulated[:, None], stim[types], base[types])
    library = rng.poisson(2000 * rng.gamma(10.0, 0.1, n_cells))
    counts = rng.poisson(profile * library[:, None]).astype(np.float32)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{t}" for t in types])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    ref = ad.AnnData(sp.csr_matrix(x), obs=obs, var=var, layers={"counts": sp.csr_matrix(counts)})
    if control_only:
        ref = ref[~stimulated].copy()

    fractions = rng.dirichlet(np.ones(3), n_bulks)
    share = rng.random((n_bulks, 3))
    share[:, 2] = 0.0
    base, stim = base.copy(), stim.copy()  # the reference's were drawn above
    for profiles in (base, stim):
        profiles[0, 40:60] *= donor_shift
        profiles /= profiles.sum(1, keepdims=True)
    truth = (1 - share)[:, :, None] * base[None] + share[:, :, None] * stim[None]
    mixed = (fractions[:, :, None] * truth).sum(1)
    reads = rng.poisson(mixed * 2e6).astype(np.float32)
    bulk = ad.AnnData(reads, obs=pd.DataFrame(index=[f"bulk{i}" for i in range(n_bulks)]), var=var)
    return ref, bulk, truth * 1e6


def _median_gene_r(estimate, truth, genes):
    return float(
        np.median(
            [np.corrcoef(np.log1p(estimate[:, g]), np.log1p(truth[:, g]))[0, 1] for g in genes]
        )
    )


def _allocation(model, bulk, mixture):
    """Each gene's bulk split by ``p_k S_gk`` (samples × types × genes, CPM; 0 where no type
    expresses the gene or the type is absent)."""
    x = np.asarray(bulk[:, model.var_names].X, dtype=np.float64)
    cpm = x / x.sum(1, keepdims=True) * 1e6
    own = mixture[:, :, None] * model.reference_signature_.T[None]
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.nan_to_num(cpm[:, None] * own / own.sum(1, keepdims=True))
        return np.nan_to_num(shares / shares.sum(2, keepdims=True) * 1e6)


def _log_error(estimate, truth):
    return float(np.abs(np.log1p(estimate) - np.log1p(truth)).mean())


def test_states_help_the_type_that_changes_and_leave_the_other_as_allocation():
    # types 0 and 1 change state between the samples, type 2 does not
    ref, bulk, truth = _state_shift_data()
    model = train_briefly(ref, max_epochs=40, labels_key="cell_type", counts_layer="counts")
    mixture = model.get_proportions(bulk.copy(), kind="rna").to_numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expression = model.get_cell_type_expression(bulk)
    assert not [w for w in caught if "states moved" in str(w.message)]
    evidence = model.state_evidence_
    assert list(evidence.columns) == ["n_states", "split_half_r", "weight", "profile_shift"]
    assert (evidence.loc[["type0", "type1"], "weight"] > 0.5).all(), evidence
    # the type that does not change: its states barely move its profile
    assert evidence.loc["type2", "profile_shift"] < 0.01, evidence
    assert expression["type0"].attrs["hpvade_state_evidence"] == evidence.loc["type0"].to_dict()
    allocation = model.get_cell_type_expression(bulk, use_states=False)
    for k, genes in ((0, range(0, 20)), (1, list(range(0, 10)) + list(range(20, 30)))):
        present = mixture[:, k] > 0.05
        r_allocation = _median_gene_r(
            allocation[f"type{k}"].to_numpy()[present], truth[present, k], genes
        )
        r_estimate = _median_gene_r(
            expression[f"type{k}"].to_numpy()[present], truth[present, k], genes
        )
        assert r_estimate > r_allocation + 0.1, (k, r_estimate, r_allocation)
        assert r_estimate > 0.8, (k, r_estimate)
    present = mixture[:, 2] > 0.05
    unchanged = _log_error(expression["type2"].to_numpy()[present], truth[present, 2])
    allocated = _log_error(allocation["type2"].to_numpy()[present], truth[present, 2])
    assert unchanged < allocated + 0.01, (unchanged, allocated)


def test_a_cohort_sets_its_donors_type_profiles():
    # the bulks' donor has genes 40-59 up 4x in type 0 only: the cohort shows it (the genes
    # follow type 0's share), so they go to type 0, where allocation spreads them over all
    ref, bulk, truth = _state_shift_data(donor_shift=4.0, n_bulks=120)
    model = train_briefly(ref, max_epochs=40, labels_key="cell_type", counts_layer="counts")
    expression = model.get_cell_type_expression(bulk)
    allocation = model.get_cell_type_expression(bulk, use_states=False)
    genes = [f"gene{j}" for j in range(40, 60)]

    def log_error(estimates, k):
        present = estimates[f"type{k}"].sum(axis=1).to_numpy() > 0
        estimate = estimates[f"type{k}"][genes].to_numpy()[present]
        return np.abs(np.log2((estimate + 1) / (truth[present, k, 40:60] + 1))).mean()

    for k in (0, 1, 2):
        assert log_error(expression, k) < 0.5 * log_error(allocation, k), k
    assert log_error(expression, 1) < 0.3


def test_cohort_factors_fit_across_samples_and_keep_a_single_sample_near_the_profiles():
    from hpvade.core import cohort_type_factors

    rng = np.random.default_rng(0)
    n_samples, n_genes, n_types = 300, 50, 4
    profiles = [rng.gamma(1.0, 100.0, size=(n_samples, n_genes)) for _ in range(n_types)]
    profiles[3][:, 0] = 0.0  # a gene type 3 never has
    proportions = rng.dirichlet(np.ones(n_types), n_samples)
    factors = rng.lognormal(0.0, 0.5, size=(n_genes, n_types))
    factors[0, 3] = 1.0
    bulk = sum(proportions[:, [k]] * profiles[k] * factors[:, k] for k in range(n_types))
    exact = cohort_type_factors(bulk, proportions, profiles, prior_samples=1e-9)
    np.testing.assert_allclose(exact, factors, rtol=1e-6)  # type 3's gene 0: the prior's 1
    pulled = cohort_type_factors(bulk, proportions, profiles)  # 10 samples' prior of 300
    assert np.abs(np.log(pulled / factors)).max() < 0.2

    assert np.abs(np.log(pulled / factors)).max() > 1e-3  # towards 1, a little
    # one sample: the prior outweighs it; no gene or type moves far
    single = cohort_type_factors(bulk[:1], proportions[:1], [p[:1] for p in profiles])
    assert np.abs(np.log(single)).max() < np.abs(np.log(factors)).max()
    # a gene no profile has (all zero) keeps factor 1
    empty = [p.copy() for p in profiles]
    for p in empty:
        p[:, 5] = 0.0
    assert np.allclose(cohort_type_factors(bulk, proportions, empty)[5], 1.0)


def test_states_the_reference_lacks_get_no_weight():
    # the reference holds control cells only: each type's two states are halves of alike
    # cells, whose fitted weights do not agree between two halves of the genes
    ref, bulk, truth = _state_shift_data(control_only=True)
    model = train_briefly(ref, max_epochs=40, labels_key="cell_type", counts_layer="counts")
    expression = model.get_cell_type_expression(bulk)
    evidence = model.state_evidence_
    assert (evidence.loc[["type0", "type1"], "weight"] < 0.1).all(), evidence
    assert (evidence["profile_shift"] < 0.01).all(), evidence
    allocation = model.get_cell_type_expression(bulk, use_states=False)
    for k in range(3):
        estimate = _log_error(expression[f"type{k}"].to_numpy(), truth[:, k])
        assert estimate < _log_error(allocation[f"type{k}"].to_numpy(), truth[:, k]) + 0.01
    # forced, every type's fitted states are followed fully
    forced = model.get_cell_type_expression(bulk, use_states=True)
    assert (model.state_evidence_["weight"] == 1.0).all()
    assert not np.allclose(forced["type0"].to_numpy(), expression["type0"].to_numpy(), rtol=1e-3)
    mixture = model.get_proportions(bulk.copy(), kind="rna").to_numpy()
    never = model.get_cell_type_expression(bulk, use_states=False)
    np.testing.assert_allclose(
        never["type2"].to_numpy(), _allocation(model, bulk, mixture)[:, 2], rtol=1e-6
    )
    assert (model.state_evidence_["weight"] == 0.0).all()


def test_a_single_sample_gets_allocation_with_a_warning_naming_the_types():
    ref, bulk, _ = _state_shift_data(n_bulks=40)
    model = train_briefly(ref, max_epochs=20, labels_key="cell_type", counts_layer="counts")
    one = bulk[:1].copy()
    with pytest.warns(UserWarning, match=r"No cell type's states moved.*type0, type1.*cohort"):
        model.get_cell_type_expression(one)
    assert (model.state_evidence_["weight"] == 0.0).all()
    assert model.state_evidence_["split_half_r"].isna().all()


def test_evidence_weights_follow_the_split_half_agreement():
    from hpvade.core import CellStates, evidence_weighted_profiles
    from hpvade.core._allocation import dense_profile

    # type 0's states differ on genes 0-39 and its samples' mixes vary; type 1's states are
    # identical but for noise on a few genes, and its samples all hold the reference's mix
    rng = np.random.default_rng(0)
    n_genes, n_samples = 400, 120
    base = rng.gamma(1.0, 1.0, size=(2, n_genes)) + 0.05
    states = np.repeat(base, 2, axis=0)  # states of type 0, 0, 1, 1
    states[1, :40] *= 6.0
    states[3, 300:305] *= 1.05
    states = states / states.sum(axis=1, keepdims=True) * 1e6
    cell_type = np.array([0, 0, 1, 1])
    frequencies = np.full(4, 0.5)
    cells = CellStates(states.T.copy(), cell_type, frequencies)
    signature = np.stack([states[:2].mean(0), states[2:].mean(0)], axis=1)
    proportions = rng.dirichlet(np.ones(2) * 3, n_samples)
    u = rng.random(n_samples)
    type0 = (1 - u)[:, None] * states[0] + u[:, None] * states[1]
    type1 = 0.5 * states[2] + 0.5 * states[3]
    bulk = proportions[:, [0]] * type0 + proportions[:, [1]] * type1
    bulk = rng.poisson(bulk * 20) / 20.0
    profiles, evidence = evidence_weighted_profiles(bulk, proportions, cells, signature)
    assert evidence.weight[0] > 0.9 and evidence.split_half_r[0] > 0.8, evidence
    assert evidence.weight[1] < 0.3, evidence
    moved = np.log(dense_profile(profiles[0], n_samples)[:, :40] / signature[:40, 0])
    assert np.corrcoef(moved.mean(axis=1), u)[0, 1] > 0.9
    # a single sample: no evidence, the reference profiles
    single, none = evidence_weighted_profiles(bulk[:1], proportions[:1], cells, signature)
    assert (none.weight == 0).all() and np.isnan(none.split_half_r).all()
    np.testing.assert_array_equal(single[0], signature[:, 0])


def test_state_aware_proportions_are_proportions(trained, test_bulk):
    bulk = test_bulk.copy()
    default = trained.get_proportions(bulk.copy()).to_numpy()
    aware = trained.get_proportions(bulk, use_states=True).to_numpy()
    assert bulk.uns["hpvade_estimator"]["use_states"] is True
    with pytest.warns(FutureWarning, match="`state_aware` was renamed `use_states` in hpvade 0.3"):
        old = trained.get_proportions(test_bulk.copy(), state_aware=True).to_numpy()
    np.testing.assert_array_equal(old, aware)
    np.testing.assert_allclose(aware.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(aware >= 0)
    truth = test_bulk.obsm["proportions"].to_numpy()
    r_default = np.corrcoef(default.ravel(), truth.ravel())[0, 1]
    r_aware = np.corrcoef(aware.ravel(), truth.ravel())[0, 1]
    assert r_aware > r_default - 0.1, (r_aware, r_default)


def test_default_epochs_are_a_step_budget():
    from hpvade.train import max_epochs_heuristic

    assert max_epochs_heuristic(1202) == 64  # 600 minibatches of 128 cells
    assert max_epochs_heuristic(100_000) == 1
    assert max_epochs_heuristic(150) == 400  # never more than scvi-tools' default


def test_cell_states_travel_with_a_saved_model(trained, test_bulk, tmp_path):
    states = trained.cell_states()
    trained.save(tmp_path / "model", overwrite=True)
    loaded = hpvade.HPVADE.load(tmp_path / "model", adata=trained.adata)
    np.testing.assert_array_equal(loaded.cell_states_.profiles, states.profiles)
    first = trained.get_scale_for_ct(test_bulk, trained.cell_types[0])
    again = loaded.get_scale_for_ct(test_bulk, trained.cell_types[0])
    np.testing.assert_allclose(again.to_numpy(), first.to_numpy(), rtol=1e-5, atol=1e-3)


def test_cell_states_need_the_vae(pbmc_split, test_bulk):
    ref = pbmc_split[0].copy()
    hpvade.HPVADE.setup_anndata(ref, labels_key="bulk_labels")
    model = hpvade.HPVADE(ref, use_vae=False)
    model.train(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="use_vae=False"):
        model.get_cell_type_expression(test_bulk.copy(), use_states=True)
    with pytest.raises(ValueError, match="use_vae=False"):
        model.get_proportions(test_bulk.copy(), use_states=True)
    # without states, the default is allocation by the reference profiles, with a warning
    with pytest.warns(UserWarning, match="use_vae=False.*allocation"):
        expression = model.get_cell_type_expression(test_bulk)
    mixture = model.get_proportions(test_bulk.copy(), kind="rna").to_numpy()
    allocation = _allocation(model, test_bulk, mixture)
    for k, name in enumerate(model.cell_types):
        np.testing.assert_allclose(expression[name].to_numpy(), allocation[:, k], rtol=1e-6)


def test_a_type_without_evidence_gets_allocation_whatever_the_others_states_claim():
    from hpvade.core import allocate, split_bulk

    rng = np.random.default_rng(0)
    signature = rng.gamma(2.0, 50.0, size=(30, 3))
    mixture = rng.dirichlet(np.ones(3), size=8)
    bulk = mixture @ signature.T * rng.lognormal(0, 0.2, size=(8, 30))
    # type 0's states claim genes 0-9 in every sample; types 1 and 2 keep their profiles
    profiles = [signature[:, 0] * np.where(np.arange(30) < 10, 5.0, 1.0)[None].repeat(8, 0)]
    profiles += [signature[:, 1], signature[:, 2]]
    weight = np.array([1.0, 0.0, 0.5])
    split = split_bulk(bulk, mixture, profiles, signature, weight, [0, 1, 2])
    states = allocate(bulk, mixture, profiles, [0, 1, 2])
    plain = allocate(bulk, mixture, list(signature.T), [0, 1, 2])
    np.testing.assert_allclose(split[0], states[0])
    np.testing.assert_allclose(split[1], plain[1])  # not states[1], which lost genes 0-9
    assert np.abs(states[1] - plain[1]).max() > 1e3
    np.testing.assert_allclose(split[2], 0.5 * states[2] + 0.5 * plain[2])
    np.testing.assert_allclose(split[2].sum(axis=1), 1e6)


def test_profiles_as_state_mixes_give_what_their_dense_arrays_give():
    from hpvade.core import StateMix, allocate, cohort_type_factors, scale_profiles, split_bulk
    from hpvade.core._allocation import dense_profile

    rng = np.random.default_rng(3)
    n_samples, n_genes = 40, 300
    signature = rng.gamma(1.0, 100.0, size=(n_genes, 3))
    mixes = [
        StateMix(rng.dirichlet(np.ones(2), n_samples), rng.gamma(1.0, 100.0, (2, n_genes))),
        signature[:, 1],  # a type whose states get no weight: its column of S
        StateMix(rng.dirichlet(np.ones(3), n_samples), rng.gamma(1.0, 100.0, (3, n_genes))),
    ]
    dense = [np.array(dense_profile(p, n_samples)) for p in mixes]
    proportions = rng.dirichlet(np.ones(3), n_samples)
    bulk = rng.gamma(2.0, 50.0, size=(n_samples, n_genes))
    fast, slow = (cohort_type_factors(bulk, proportions, p) for p in (mixes, dense))
    np.testing.assert_allclose(fast, slow, rtol=1e-9)
    mixes, dense = scale_profiles(mixes, fast), scale_profiles(dense, fast)
    weight = np.array([0.7, 0.0, 1.0])
    for a, b in (
        (
            allocate(bulk, proportions, mixes, [0, 1, 2]),
            allocate(bulk, proportions, dense, [0, 1, 2]),
        ),
        (
            split_bulk(bulk, proportions, mixes, signature, weight, [2, 0, 1]),
            split_bulk(bulk, proportions, dense, signature, weight, [2, 0, 1]),
        ),
    ):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-9)
