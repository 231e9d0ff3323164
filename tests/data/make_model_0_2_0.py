"""Provenance of ``tests/data/model_0_2_0/``: a small model saved by hpvade 0.2.0.

Run from a checkout of the 0.2.0 commit (978fdb4)::

    git worktree add /tmp/v020 978fdb4
    PYTHONPATH=/tmp/v020 python tests/data/make_model_0_2_0.py

It trains on the 700 PBMCs scanpy ships, asks for the cell states (so the saved model pickles
0.2.0's ``CellStates``), saves the model and the proportions 0.2.0 served on a fixed bulk.
"""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scvi

import hpvade

assert hpvade.__version__ == "0.2.0", hpvade.__version__
out = Path(__file__).parent
scvi.settings.seed = 0
ref = hpvade.datasets.pbmc68k_reference()
hpvade.HPVADE.setup_anndata(ref, labels_key="bulk_labels")
model = hpvade.HPVADE(ref, n_hidden=32, n_latent=8)
model.train(max_epochs=5, n_pseudobulk=400)
rng = np.random.default_rng(0)
linear = np.expm1(ref.X.toarray() if hasattr(ref.X, "toarray") else ref.X)
picks = rng.integers(0, ref.n_obs, size=(12, 200))
values = linear[picks].sum(axis=1)
bulk = ad.AnnData(values, var=pd.DataFrame(index=ref.var_names))
bulk.obs_names = [f"s{i}" for i in range(bulk.n_obs)]
clean = bulk.copy()
model.get_cell_type_expression(bulk)
proportions = model.get_proportions(bulk)
model.save(out / "model_0_2_0", overwrite=True)
clean.write_h5ad(out / "model_0_2_0" / "bulk.h5ad")
proportions.to_csv(out / "model_0_2_0" / "proportions_0_2_0.csv")
