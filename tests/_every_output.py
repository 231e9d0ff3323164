"""Every output a saved model serves, as arrays: what a redesign must leave unchanged.

``python -m tests._every_output`` writes them for the committed 0.2.0 model
(``tests/data/model_0_2_0/outputs.npz``); ``tests/test_saved_models.py`` compares.
"""

from pathlib import Path

import anndata as ad
import numpy as np
import scvi

import hpvade

SAVED = Path(__file__).parent / "data" / "model_0_2_0"
OUTPUTS = SAVED / "outputs.npz"
#: The fixture was pickled under numpy 2, whose pickles numpy 1 cannot read (``numpy._core``);
#: the lowest-versions run (numpy 1) skips the tests that load it.
READABLE = int(np.__version__.split(".")[0]) >= 2


def load_saved_model() -> tuple[hpvade.HPVADE, ad.AnnData]:
    ref = hpvade.datasets.pbmc68k_reference()
    hpvade.HPVADE.setup_anndata(ref, labels_key="bulk_labels")
    return hpvade.HPVADE.load(str(SAVED), adata=ref), ad.read_h5ad(SAVED / "bulk.h5ad")


def every_output() -> dict[str, np.ndarray]:
    """Proportions of both kinds and both methods, the scores, the unknown share, the flag's
    threshold and the intervals (calibrated again), whole-sample fractions, cell-type
    expression, then adapt, its threshold, the adapted proportions and their intervals."""
    scvi.settings.seed = 0
    model, bulk = load_saved_model()
    out = {}
    for kind in ("cell", "rna"):
        for method in ("fit", "network"):
            part = bulk.copy()
            out[f"p_{kind}_{method}"] = model.get_proportions(part, kind=kind, method=method)
            for key in part.obs.columns:
                out[f"obs_{kind}_{method}_{key}"] = part.obs[key].to_numpy(float)
    out["threshold"] = model.calibrate_unexplained()
    model.interval_scale_ = model.signature_ratios_ = None  # calibrated again, as after train
    part = bulk.copy()
    model.get_proportions(part, n_draws=10)
    out["interval_scale"] = model.interval_scale_
    for end in ("std", "lower", "upper"):
        out[f"interval_{end}"] = part.obsm[f"hpvade_proportions_{end}"]
    share = np.full(bulk.n_obs, np.nan)
    share[:6] = np.linspace(0.05, 0.3, 6)
    out["whole_sample"] = model.get_proportions(bulk.copy(), unknown_share=share)
    out["states"] = model.get_proportions(bulk.copy(), use_states=True)
    for cell_type, table in model.get_cell_type_expression(bulk.copy()).items():
        out[f"expression_{cell_type}"] = table
    out["adapt"] = np.array(model.adapt(bulk.copy())["validation_error"])
    out["threshold_adapted"] = model.unexplained_threshold_
    part = bulk.copy()
    out["p_adapted"] = model.get_proportions(part, n_draws=5)
    out["interval_adapted_lower"] = part.obsm["hpvade_proportions_lower"]
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


if __name__ == "__main__":
    np.savez_compressed(OUTPUTS, **every_output())
