"""Demo: train hpvade on half of scanpy's real PBMCs, deconvolve pseudobulks of the other half.

Prints overall Pearson r, RMSE and wall time for hpvade (as trained, and adapted to the test
bulks without labels) and for NNLS on the same signature, the per-type r, and writes the
proportions to ``examples/output/pbmc_demo.h5ad``.

Run: ``bash scripts/demo`` (sets up the environment) or ``python examples/pbmc_demo.py``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi

import hpvade
from hpvade.datasets import PBMC_LABELS_KEY

SEED = 0

# Type names such as "CD4+/CD25 T Reg" hold slashes, which anndata warns about when writing.
warnings.filterwarnings("ignore", message="Forward slashes")


def undefined_r_notes(per_type: pd.DataFrame) -> list[str]:
    """Say in words why a per-type r is missing (NaN): the estimate never varies."""
    return [
        f"{name}: r is undefined for {', '.join(map(str, per_type.index[per_type[name].isna()]))}"
        ": the method gives the same fraction (usually 0) in every sample, so there is nothing "
        "to correlate."
        for name in per_type.columns
        if per_type[name].isna().any()
    ]


def main(
    max_epochs: int | None = None, n_samples: int = 300, out: str = "examples/output"
) -> dict:
    scvi.settings.seed = SEED
    cells = hpvade.datasets.pbmc68k_reference()
    ref, test = hpvade.datasets.split_by_type(cells, PBMC_LABELS_KEY, fraction=0.5, seed=SEED)
    bulk = hpvade.pp.simulate_pseudobulk(
        test,
        PBMC_LABELS_KEY,
        n_pseudobulk=n_samples,
        cells_per_pseudobulk=500,
        dirichlet_alpha=1.0,
        seed=SEED + 1,
    )
    truth = bulk.obsm["proportions"]
    print(f"reference: {ref.n_obs} cells, test pseudobulks: {bulk.n_obs} from {test.n_obs} cells")

    start = time.perf_counter()
    hpvade.HPVADE.setup_anndata(ref, labels_key=PBMC_LABELS_KEY)
    model = hpvade.HPVADE(ref)
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    props = model.get_proportions(bulk)
    t_hpvade = time.perf_counter() - start

    # Adapting to the bulk cohort itself (no labels): fine-tunes S and the network on it.
    start = time.perf_counter()
    adapted = bulk.copy()
    model.adapt(adapted)
    props_adapted = model.get_proportions(adapted, key_added="hpvade_adapted_proportions")
    t_adapt = t_hpvade + time.perf_counter() - start

    start = time.perf_counter()
    signature = hpvade.pp.build_signature(ref, PBMC_LABELS_KEY)
    nnls = pd.DataFrame(
        hpvade.baselines.nnls_proportions(bulk[:, signature.index].X, signature),
        index=bulk.obs_names,
        columns=signature.columns,
    )
    t_nnls = time.perf_counter() - start

    rows = {
        "hpvade": {**hpvade.metrics.evaluate(props, truth), "seconds": t_hpvade},
        "hpvade + adapt": {**hpvade.metrics.evaluate(props_adapted, truth), "seconds": t_adapt},
        "NNLS (same S)": {**hpvade.metrics.evaluate(nnls, truth), "seconds": t_nnls},
    }
    table = pd.DataFrame(rows).T[["r", "rmse", "mean_type_r", "ccc", "mae", "seconds"]]
    per_type = pd.DataFrame(
        {
            "hpvade": hpvade.metrics.per_type_pearson(props, truth),
            "hpvade + adapt": hpvade.metrics.per_type_pearson(props_adapted, truth),
            "NNLS": hpvade.metrics.per_type_pearson(nnls, truth),
        }
    )
    notes = undefined_r_notes(per_type)
    per_type = per_type.astype(object).where(per_type.notna(), "constant")
    with pd.option_context("display.precision", 3, "display.width", 120):
        print("\nOverall (held-out pseudobulks)\n", table, sep="")
        print("\nPer-type Pearson r\n", per_type, sep="")
    print("\n".join(notes))
    print(f"scale check: {model.scale_check_}")

    Path(out).mkdir(parents=True, exist_ok=True)
    bulk.obsm["nnls_proportions"] = nnls
    bulk.obsm["hpvade_adapted_proportions"] = props_adapted
    path = Path(out) / "pbmc_demo.h5ad"
    bulk.write_h5ad(path)
    print(
        f"\nproportions written to {path} (obsm: hpvade_proportions, "
        "hpvade_adapted_proportions, nnls_proportions; proportions = truth)"
    )
    return {"table": table, "per_type": per_type, "model": model}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=300)
    parser.add_argument("--out", default="examples/output")
    args = parser.parse_args()
    np.set_printoptions(precision=3)
    main(args.max_epochs, args.n_samples, args.out)
