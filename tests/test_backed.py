"""References opened with backed="r" give the same signature and pseudobulks as in memory."""

import anndata as ad
import numpy as np
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
