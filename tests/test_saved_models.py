"""Models saved by earlier releases still load and serve what they served."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hpvade
from tests._every_output import READABLE

pytestmark = pytest.mark.skipif(not READABLE, reason="the fixture is a numpy 2 pickle")

SAVED_0_2_0 = Path(__file__).parent / "data" / "model_0_2_0"


def test_a_model_saved_by_0_2_0_loads_and_serves_its_proportions():
    """The fixture (tests/data/make_model_0_2_0.py) pickles 0.2.0's ``hpvade._states``
    CellStates, a module that has since moved into ``hpvade.core``."""
    ref = hpvade.datasets.pbmc68k_reference()
    hpvade.HPVADE.setup_anndata(ref, labels_key="bulk_labels")
    model = hpvade.HPVADE.load(str(SAVED_0_2_0), adata=ref)
    assert model.cell_states_.profiles.shape[0] == ref.n_vars
    bulk = ad.read_h5ad(SAVED_0_2_0 / "bulk.h5ad")
    served = model.get_proportions(bulk)
    before = pd.read_csv(SAVED_0_2_0 / "proportions_0_2_0.csv", index_col=0)
    assert list(served.columns) == list(before.columns)
    np.testing.assert_allclose(served.to_numpy(), before.to_numpy(), rtol=0, atol=1e-9)


def test_every_output_of_the_saved_model_is_what_it_was():
    """Proportions (both kinds, both methods), scores, unknown share, intervals, whole-sample
    fractions, cell-type expression and adapt, against ``tests/data/model_0_2_0/outputs.npz``
    (written by ``python -m tests._every_output``). A change that moves one must say so and
    rewrite the file."""
    from tests._every_output import OUTPUTS, every_output

    expected = np.load(OUTPUTS)
    served = every_output()
    assert sorted(served) == sorted(expected.files)
    moved = {
        name: float(np.nanmax(np.abs(served[name] - expected[name])))
        for name in expected.files
        if not np.allclose(served[name], expected[name], rtol=0, atol=1e-10, equal_nan=True)
    }
    assert not moved, moved
