"""Data that stays on disk or out of memory: backed references and bulks, and Dask-backed bulks."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hpvade

from .conftest import make_reference


@pytest.mark.parametrize("with_counts", [False, True])
def test_backed_reference_matches_in_memory(tmp_path, with_counts):
    adata = make_reference(n_cells=300)
    path = tmp_path / "ref.h5ad"
    if not with_counts:
        del adata.layers["counts"]
    # pandas >= 3 stores string indices as StringArray, which anndata 0.12 writes only on
    # request (seen on the GPU machine's pandas 3.0.6); pandas 2 is unaffected
    allow = {"allow_write_nullable_strings": True}
    if not hasattr(ad.settings, "allow_write_nullable_strings"):  # anndata < 0.11
        allow = {}
    with ad.settings.override(**allow):
        adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        kwargs = {"counts_layer": "counts"} if with_counts else {}
        S_mem = hpvade.pp.build_signature(adata, "cell_type", **kwargs)
        S_backed = hpvade.pp.build_signature(backed, "cell_type", chunk_size=64, **kwargs)
        np.testing.assert_allclose(S_backed.to_numpy(), S_mem.to_numpy(), rtol=1e-9)
        pb_mem = hpvade.pp.simulate_pseudobulk(
            adata, "cell_type", n_pseudobulk=20, seed=2, **kwargs
        )
        pb_backed = hpvade.pp.simulate_pseudobulk(
            backed, "cell_type", n_pseudobulk=20, seed=2, chunk_size=64, **kwargs
        )
        np.testing.assert_allclose(pb_backed.X, pb_mem.X, rtol=1e-5)
        np.testing.assert_array_equal(
            pb_backed.obsm["proportions"].to_numpy(), pb_mem.obsm["proportions"].to_numpy()
        )
    finally:
        backed.file.close()


def test_a_backed_bulk_is_deconvolved_chunk_by_chunk(trained, test_bulk, tmp_path, monkeypatch):
    """Same proportions, scores and flag as the bulk in memory, read a few samples at a time."""
    import hpvade.model._deconvolution as deconvolution

    bulk = test_bulk[:60].copy()
    path = tmp_path / "bulk.h5ad"
    bulk.write_h5ad(path)
    in_memory = bulk.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = trained.get_proportions(in_memory, n_draws=3)
    monkeypatch.setattr(deconvolution, "BACKED_CHUNK_VALUES", 25 * bulk.n_vars)  # 3 chunks
    backed = ad.read_h5ad(path, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trained.get_proportions(backed, n_draws=3)
    np.testing.assert_allclose(result.to_numpy(), expected.to_numpy(), atol=1e-12)
    assert list(result.index) == list(bulk.obs_names)
    for key in ("hpvade_fit_score", "hpvade_unexplained_score", "hpvade_unexplained"):
        expected_values = in_memory.obs[key].to_numpy(float)
        # float32 scores: the matmul's blocking depends on the batch, hence rtol
        np.testing.assert_allclose(backed.obs[key].to_numpy(float), expected_values, rtol=1e-5)
    np.testing.assert_allclose(
        backed.obsm["hpvade_proportions_upper"], in_memory.obsm["hpvade_proportions_upper"]
    )
    assert "hpvade_gene_report" in backed.uns and "hpvade_unknown_lower_bound" in backed.obs
    assert backed.isbacked  # the user's data stays on disk


def test_a_backed_cohort_shows_progress_where_a_bar_redraws(
    trained, test_bulk, tmp_path, monkeypatch
):
    """One progress step per chunk in a terminal or notebook; none in a log file."""
    import hpvade.model._deconvolution as deconvolution

    path = tmp_path / "bulk.h5ad"
    test_bulk[:60].copy().write_h5ad(path)
    monkeypatch.setattr(deconvolution, "BACKED_CHUNK_VALUES", 25 * test_bulk.n_vars)  # 3 chunks
    bars = []

    def recording_track(sequence, description, disable):
        bars.append((list(sequence), disable))
        return sequence

    monkeypatch.setattr(deconvolution, "track", recording_track)
    for interactive in (True, False):
        monkeypatch.setattr(deconvolution, "interactive_output", lambda shown=interactive: shown)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trained.get_proportions(ad.read_h5ad(path, backed="r"))
    assert bars == [([0, 25, 50], False), ([0, 25, 50], True)]


def test_a_dask_backed_bulk_gives_the_in_memory_proportions(trained, test_bulk):
    da = pytest.importorskip("dask.array")
    bulk = test_bulk[:60].copy()
    expected = trained.get_proportions(bulk.copy())
    in_memory = bulk.copy()
    trained.get_proportions(in_memory)
    lazy = bulk.copy()
    lazy.X = da.from_array(np.asarray(bulk.X), chunks=(25, 200))  # blocks of genes too
    result = trained.get_proportions(lazy)
    np.testing.assert_allclose(result.to_numpy(), expected.to_numpy(), atol=1e-12)
    pd.testing.assert_index_equal(result.index, bulk.obs_names)
    fit_score = in_memory.obs["hpvade_fit_score"]  # float32 scores, summed in other blocks
    np.testing.assert_allclose(lazy.obs["hpvade_fit_score"], fit_score, rtol=1e-5)
    assert lazy.obs["hpvade_unexplained"].dtype == bool
    assert lazy.uns["hpvade_estimator"] == in_memory.uns["hpvade_estimator"]
    with pytest.raises(ValueError, match="need it in memory"):
        trained.get_proportions(lazy, n_draws=3)
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        on_cluster = trained.get_proportions(lazy.copy())
    np.testing.assert_allclose(on_cluster.to_numpy(), expected.to_numpy(), atol=1e-12)


def test_a_dask_backed_bulk_is_written_to_zarr_as_get_proportions_serves_it(
    trained, test_bulk, tmp_path
):
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    bulk = test_bulk[:60].copy()
    expected = trained.get_proportions(bulk.copy())
    lazy = bulk.copy()
    lazy.X = da.from_array(np.asarray(bulk.X), chunks=(25, 200))
    trained.write_proportions(lazy, tmp_path / "results.zarr")
    written = zarr.open_array(tmp_path / "results.zarr", path="results", mode="r")
    columns = list(written.attrs["columns"])
    assert columns[: len(trained.cell_types)] == list(trained.cell_types)
    values = pd.DataFrame(written[:], index=bulk.obs_names, columns=columns)
    np.testing.assert_allclose(values[expected.columns], expected.to_numpy(), atol=1e-12)
    by_blocks = lazy.copy()
    trained.get_proportions(by_blocks)  # the unknown-content score is each block's
    for name in ("unknown_lower_bound", "fit_score", "unexplained_score"):
        np.testing.assert_allclose(values[name], by_blocks.obs[f"hpvade_{name}"], atol=1e-12)
    assert "hpvade_proportions" not in lazy.obsm  # nothing written on the bulk
    with pytest.raises(TypeError, match="must be a Dask array"):
        trained.write_proportions(bulk, tmp_path / "again.zarr")
