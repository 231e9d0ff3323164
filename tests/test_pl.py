"""Plots render to PNG and draw what they claim: bars, points, genes, loss curves, titles."""

import matplotlib

matplotlib.use("Agg")  # render off-screen, before pyplot is imported

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import hpvade
from hpvade.module import LOSS_TERMS


@pytest.fixture(scope="module")
def predicted(trained, test_bulk):
    bulk = test_bulk.copy()
    props = trained.get_proportions(bulk)
    return bulk, props, test_bulk.obsm["proportions"]


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stacked_bars_one_segment_per_sample_and_type(predicted, tmp_path):
    bulk, props, _ = predicted
    sub = bulk[:12].copy()
    png = tmp_path / "b.png"
    ax = hpvade.pl.proportions(sub, sort_by=props.columns[0], title="PBMC", save=png)
    assert _is_png(tmp_path / "b.png")
    assert len(ax.patches) == 12 * props.shape[1]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(props.columns)
    assert ax.get_title() == "PBMC"
    # each bar stack reaches 1 (proportions sum to one)
    tops = {}
    for patch in ax.patches:
        x = round(patch.get_x(), 3)
        tops[x] = max(tops.get(x, 0), patch.get_y() + patch.get_height())
    np.testing.assert_allclose(list(tops.values()), 1.0, atol=1e-6)
    # sorted by the first type, descending
    first = [p.get_height() for p in ax.patches[:12]]
    assert first == sorted(first, reverse=True)
    plt.close("all")
    with pytest.raises(KeyError, match="get_proportions"):
        hpvade.pl.proportions(bulk, key="missing")


def test_predicted_vs_true_titles_carry_r_and_rmse(predicted, tmp_path):
    _, props, truth = predicted
    ax = hpvade.pl.predicted_vs_true(props, truth, title="held out", save=tmp_path / "s.png")
    assert _is_png(tmp_path / "s.png")
    n_points = sum(len(c.get_offsets()) for c in ax.collections)
    assert n_points == props.size
    r, rmse = hpvade.metrics.pearson(props, truth), hpvade.metrics.rmse(props, truth)
    assert ax.get_title() == f"held out\nr={r:.3f}  RMSE={rmse:.3f}"
    plt.close("all")

    axes = hpvade.pl.predicted_vs_true(props, truth, per_type=True, save=tmp_path / "t.png")
    assert _is_png(tmp_path / "t.png")
    assert len(axes) == props.shape[1]
    for panel, column in zip(axes, props.columns, strict=True):
        assert len(panel.collections[0].get_offsets()) == len(props)
        r = np.corrcoef(props[column], truth.loc[props.index, column])[0, 1]
        assert panel.get_title().startswith(f"{column}\nr={r:.2f}  RMSE=")
    plt.close("all")


def test_signature_heatmap_shows_markers_of_each_type(trained, tmp_path):
    ax = hpvade.pl.signature_heatmap(trained, n_genes=3, save=tmp_path / "h.png")
    assert _is_png(tmp_path / "h.png")
    signature = trained.get_signature()
    image = ax.images[0].get_array()
    assert image.shape == (3 * signature.shape[1], signature.shape[1])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(signature.columns)
    markers = hpvade.tl.signature_markers(signature, 3)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(markers.index)
    # a type's markers are highest in that type's own column
    for gene, cell_type in markers.items():
        assert signature.loc[gene].idxmax() == cell_type
    plt.close("all")


def test_training_history_draws_every_loss_term(trained, tmp_path):
    ax = hpvade.pl.training_history(trained, save=tmp_path / "l.png")
    assert _is_png(tmp_path / "l.png")
    labels = [line.get_label() for line in ax.get_lines()]
    for term in LOSS_TERMS:
        assert f"{term}_train" in labels
    n_epochs = len(trained.history["bulk_loss_train"])
    assert len(ax.get_lines()[labels.index("bulk_loss_train")].get_xdata()) == n_epochs
    assert f"ratio {trained.scale_check_['scale_ratio']:.3f}" in ax.get_title()
    plt.close("all")
    with pytest.raises(ValueError, match="train it first"):
        hpvade.pl.training_history(pd.Series(dtype=float))
