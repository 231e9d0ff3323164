"""Off the pseudobulk distribution: is the unadapted model ever worse than NNLS?

Held-out PBMC scenarios (scanpy's pbmc68k cells, split 50/50 by type as in the accuracy
benchmark): a reference lacking dendritic cells, one lacking CD14+ monocytes, per-sample
variation (each gene of each sample × exp(N(0, σ²)), σ 0.3 on 50 samples and 0.4 on 40), and
labels at another granularity (louvain clusters instead of cell types). For each: NNLS on the
reference signature, hpvade with defaults and after ``adapt``, over several seeds; with a
missing type also the Spearman correlation of hpvade's unknown fraction with that type's share.

Run ``.venv/bin/python benchmarks/robustness.py`` (``--seeds 0,1,2``); writes
``results/robustness.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scvi
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import stamp  # noqa: E402
from scenarios import _with_x, simulate, without_type  # noqa: E402

import hpvade  # noqa: E402
from hpvade.data._bulk import bulk_to_cpm  # noqa: E402

#: The code that runs, stamped when the run starts (before any edit during it).
PRODUCED_BY = stamp()

LABELS = "bulk_labels"


def cells() -> ad.AnnData:
    """The 700 pbmc68k cells (log1p) with both cell types and louvain clusters."""
    adata = sc.datasets.pbmc68k_reduced()
    out = adata.raw.to_adata()
    out.obs = adata.obs[[LABELS, "louvain"]].copy()
    return out


def scenarios(n_samples: int = 300) -> dict:
    """``name -> (reference, bulk, labels key, missing type or None)``."""
    data = cells()
    out = {}
    for labels in (LABELS, "louvain"):
        ref, test = hpvade.datasets.split_by_type(data, labels, fraction=0.5, seed=0)
        if labels == "louvain":
            out["louvain clusters as labels"] = (
                ref,
                simulate(test, 300, seed=1, labels_key=labels),
                labels,
                None,
            )
            continue
        clean = simulate(test, n_samples, seed=1, labels_key=labels)
        out["reference lacks Dendritic"] = (
            without_type(ref, labels, "Dendritic"),
            clean,
            labels,
            "Dendritic",
        )
        out["reference lacks CD14+ Monocyte"] = (
            without_type(ref, labels, "CD14+ Monocyte"),
            clean,
            labels,
            "CD14+ Monocyte",
        )
        rng = np.random.default_rng(123)
        for sigma, n in ((0.3, 50), (0.4, 40)):
            bulk = simulate(test, n, seed=3, labels_key=labels)
            x = np.asarray(bulk.X, dtype=float) * np.exp(rng.normal(0, sigma, bulk.shape))
            out[f"per-sample variation sigma {sigma} ({n} samples)"] = (
                ref,
                _with_x(bulk, x),
                labels,
                None,
            )
    return out


def pearson(pred: pd.DataFrame, truth: pd.DataFrame) -> float:
    return hpvade.metrics.pearson(pred[truth.columns], truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output", default=str(HERE / "results" / "robustness.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, unknown_rows = [], []
    for name, (ref, bulk, labels, missing) in scenarios().items():
        truth = bulk.obsm["proportions"]
        known = [c for c in truth.columns if c != missing]
        signature = hpvade.pp.build_signature(ref, labels)
        cpm = bulk_to_cpm(bulk, signature.index)
        nnls = hpvade.baselines.nnls_proportions(cpm, signature)
        nnls = pd.DataFrame(nnls, bulk.obs_names, signature.columns)
        rows.append({"scenario": name, "method": "NNLS", "seed": 0,
                     "r": pearson(nnls, truth[known])})  # fmt: skip
        for seed in seeds:
            scvi.settings.seed = seed
            reference = ref.copy()
            hpvade.HPVADE.setup_anndata(reference, labels_key=labels)
            model = hpvade.HPVADE(reference)
            model.train(enable_progress_bar=False)
            served = bulk.copy()
            props = model.get_proportions(served)
            rows.append({"scenario": name, "method": "hpvade", "seed": seed,
                         "r": pearson(props, truth[known])})  # fmt: skip
            if missing is not None:
                rho = spearmanr(served.obs["hpvade_unknown_fraction"], truth[missing]).statistic
                unknown_rows.append({"scenario": name, "seed": seed, "spearman": rho})
            model.adapt(bulk.copy())
            adapted = model.get_proportions(bulk.copy())
            rows.append({"scenario": name, "method": "hpvade + adapt", "seed": seed,
                         "r": pearson(adapted, truth[known])})  # fmt: skip
            print(name, seed, [round(r["r"], 3) for r in rows[-2:]], flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby(["scenario", "method"])["r"].agg(["min", "median", "max", "size"])
    unknown = pd.DataFrame(unknown_rows)
    text = "\n".join(
        [
            "# Robustness: held-out PBMC scenarios off the pseudobulk distribution",
            "",
            f"Seeds {seeds}; default training. Produced by `benchmarks/robustness.py` at "
            f"{PRODUCED_BY}. Pearson r "
            "over all (sample, type) pairs on the types the reference knows.",
            "",
            summary.round(3).to_markdown(),
            "",
            "## Unknown fraction against the missing type's share (Spearman)",
            "",
            unknown.round(3).to_markdown(index=False) if len(unknown) else "(none)",
            "",
        ]
    )
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
