"""Whole-sample fractions from a share of unknown cells the user knows, and the map from the
unknown-content score to that share, fitted on the samples where it was measured."""

import warnings

import numpy as np
import pandas as pd
import pytest

from hpvade.core import fit_unknown_share_map, unknown_cell_shares, whole_sample_fractions

LABELS = "bulk_labels"
MISSING = "CD14+ Monocyte"


def test_cell_fractions_of_the_whole_sample_are_the_known_ones_scaled(trained, test_bulk):
    bulk = test_bulk[:40].copy()
    known = trained.get_proportions(bulk.copy())
    share = np.linspace(0.0, 0.8, bulk.n_obs)
    whole = trained.get_proportions(bulk, unknown_share=share)
    assert list(whole.columns) == [*trained.cell_types, "unknown"]
    np.testing.assert_allclose(whole["unknown"], share)
    np.testing.assert_allclose(whole[trained.cell_types], known.mul(1 - share, axis=0), atol=1e-12)
    np.testing.assert_allclose(whole.sum(axis=1), 1.0)
    pd.testing.assert_frame_equal(bulk.obsm["hpvade_proportions"], whole)
    # a Series (any order) and an obs column give the same
    series = pd.Series(share, index=bulk.obs_names)[::-1]
    again = trained.get_proportions(bulk.copy(), unknown_share=series)
    pd.testing.assert_frame_equal(again, whole)
    bulk.obs["purity"] = 1 - share
    bulk.obs["tumour"] = share
    np.testing.assert_allclose(trained.get_proportions(bulk, unknown_share="tumour"), whole)


def test_rna_fractions_count_the_unknown_cells_rna_content():
    known = np.array([[0.5, 0.5], [1.0, 0.0]])  # RNA fractions of the known part
    content = np.array([1.0, 3.0])  # RNA per cell
    share = np.array([0.5, 0.5])  # unknown cells
    whole = whole_sample_fractions(known, share, "rna", content, unknown_content=2.0)
    # sample 0: known cells per unit RNA 0.5 + 1/6 -> RNA per known cell 1.5; unknown cells
    # hold 2 x the mean content 2 = 4: RNA share 0.5 x 4 / (0.5 x 4 + 0.5 x 1.5)
    first = 2.0 / (2.0 + 0.75)
    np.testing.assert_allclose(whole[0], [0.5 * (1 - first), 0.5 * (1 - first), first])
    second = 2.0 / (2.0 + 0.5)  # known cells are all of type 0 (content 1)
    np.testing.assert_allclose(whole[1], [1 - second, 0.0, second])
    cells = whole_sample_fractions(known, share, "cell", content, unknown_content=2.0)
    np.testing.assert_allclose(cells, [[0.25, 0.25, 0.5], [0.5, 0.0, 0.5]])


def test_unknown_share_errors_say_what_to_pass(trained, test_bulk):
    bulk = test_bulk[:10].copy()
    with pytest.raises(ValueError, match="between 0 and 1.*70 percent: 0.7"):
        trained.get_proportions(bulk, unknown_share=np.full(10, 70.0))
    with pytest.raises(ValueError, match="3 values for 10 samples"):
        trained.get_proportions(bulk, unknown_share=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no value for 5 samples"):
        trained.get_proportions(bulk, unknown_share=pd.Series(0.1, index=bulk.obs_names[:5]))
    with pytest.raises(KeyError, match="not a column of `bulk.obs`"):
        trained.get_proportions(bulk, unknown_share="purity")
    with pytest.raises(ValueError, match="at least 5 samples with a measured share; got 2"):
        trained.get_proportions(bulk, unknown_share=[0.1, 0.2] + [np.nan] * 8)
    assert "hpvade_proportions" not in bulk.obsm


def test_the_map_from_the_score_reads_unmeasured_samples(missing_type_model, flag_bulk):
    # the reference lacks monocytes; 10 samples have their monocyte share measured
    truth = flag_bulk.obsm["proportions"][MISSING].to_numpy()
    measured = np.full(flag_bulk.n_obs, np.nan)
    measured[:10] = truth[:10]
    bulk = flag_bulk.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unexplained-samples warning
        whole = missing_type_model.get_proportions(bulk, unknown_share=measured)
    fitted = bulk.uns["hpvade_unknown_map"]
    assert fitted["served"] and fitted["n_measured"] == 10
    assert fitted["loo_error"] < fitted["loo_error_mean"]
    error = np.abs(whole["unknown"].to_numpy()[10:] - truth[10:]).mean()
    assert error <= 0.05, (error, fitted)
    np.testing.assert_allclose(whole["unknown"].to_numpy()[:10], truth[:10])


def test_a_score_that_does_not_follow_the_share_serves_nothing(trained, flag_bulk):
    # the reference is complete: the score follows nothing, whatever the "measured" shares
    rng = np.random.default_rng(0)
    measured = np.full(60, np.nan)
    measured[:12] = rng.uniform(0, 0.6, 12)
    bulk = flag_bulk[:60].copy()
    with pytest.warns(UserWarning, match="does not predict the measured unknown share") as caught:
        whole = trained.get_proportions(bulk, unknown_share=measured)
    assert any(w.filename == __file__ for w in caught), [w.filename for w in caught]
    assert whole.iloc[12:].isna().all().all()
    np.testing.assert_allclose(whole["unknown"].to_numpy()[:12], measured[:12])
    assert not bulk.uns["hpvade_unknown_map"]["served"]


def test_leave_one_out_errors_are_those_of_refitting_without_each_sample():
    rng = np.random.default_rng(1)
    score = rng.uniform(0, 0.2, 12)
    share = 0.1 + 3 * score + rng.normal(0, 0.02, 12)
    fitted = fit_unknown_share_map(score, share)
    refits = []
    for i in range(12):
        keep = np.arange(12) != i
        slope, intercept = np.polyfit(score[keep], share[keep], 1)
        refits.append(abs(share[i] - intercept - slope * score[i]))
    assert fitted.loo_error == pytest.approx(np.mean(refits))
    assert fitted.served and fitted.slope == pytest.approx(3, abs=0.3)
    shares, _ = unknown_cell_shares(score, np.where(np.arange(12) < 8, share, np.nan))
    assert np.isfinite(shares).all()
