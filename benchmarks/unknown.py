"""Content the reference lacks (issue "Unknown content"): hpvade's unknown fraction and its
unexplained-sample flag against truth.

1. Pseudobulk scenario, per reference (scanpy's pbmc68k PBMCs, the Hao PBMCs of
   ``data/real``) and left-out type: cells split 50/50 by type; the reference is one half
   without that type; 300 bulks of the other half, each a Dirichlet(1) mix of the remaining
   types' cells (500 cells) with the left-out type's cells (500 cells) mixed in at a cell share
   u ~ U(0, 0.9). Also 300 bulks of all types against the complete reference (u = 0).
   Scored: MAE, Spearman and slope of ``obs["hpvade_unknown_lower_bound"]`` (a share of RNA)
   against u, the share of samples flagged (``obs["hpvade_unexplained"]``) and whether
   ``get_proportions`` warned. Also, for each left-out type: the map from that score to u
   fitted on 10 measured bulks (``get_proportions(unknown_share=...)`` with u for the first
   10 bulks, NaN for the rest): its leave-one-out MAE, the cohort mean's, and the MAE of the
   shares it serves for the other 290; and the type added back (the complete reference's
   model, the same seed): the MAE and Spearman of its estimated cell share of that type;
   and the floor of any map from the score (isotonic least squares on all 300, in-sample).
   Also the Spearman between the fit score and the unexplained score across each case's bulks.
   Beside it, one alternative that is not served: a cohort fit with an explicit unknown
   component (``cohort_unknown``: one extra non-negative profile, learned from the cohort by
   alternating least squares with S fixed).
2. Real bulk (``data/real``; Hao reference, defaults): the unknown fraction of each Racle node
   (truth: cancer + other cells) and Finotello donor (truth: neutrophils + other), and of the
   Hoek PBMCs (flow cytometry of 5 types summing to 1: truth 0), with the cohort fit beside it;
   and the Racle nodes given their true share (``unknown_share``): r and RMSE of the whole-sample
   fractions of the four measured types against flow cytometry, beside the fractions of the
   known cells compared with the same flow figures.

Run ``.venv/bin/python benchmarks/unknown.py --seeds 0,1,2``; writes ``results/unknown.md``.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import scvi
from provenance import stamp
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression

import hpvade
from hpvade.core._robust_kernel import weighted_coefficients
from hpvade.data._bulk import prepare_bulk
from hpvade.data._pseudobulk import mix_cells, sample_cell_counts

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "real"
N_BULKS = 300
CELLS = 500
MAX_SHARE = 0.9
#: Bulks with a measured unknown share, for the map from the score.
N_MEASURED = 10
LEFT_OUT = {
    "pbmc68k": ["CD14+ Monocyte", "CD19+ B", "CD56+ NK", "Dendritic", "CD34+"],
    "Hao": ["Monocytes", "B cells", "NK cells", "mDC", "Platelet"],
}
LABELS = {"pbmc68k": "bulk_labels", "Hao": "cell_type"}


def load_cells(name: str) -> ad.AnnData:
    """log1p-normalised cells; Hao's with its counts in ``layers["counts"]``."""
    if name == "pbmc68k":
        return hpvade.datasets.pbmc68k_reference()
    cells = ad.read_h5ad(DATA / "hao_pbmc_reference.h5ad")
    cells.layers["counts"] = cells.X.copy()
    sc.pp.normalize_total(cells)
    sc.pp.log1p(cells)
    cells.obs["cell_type"] = cells.obs["cell_type"].astype("category")
    return cells


def linear_sums(cells: ad.AnnData, counts: sp.csr_matrix) -> np.ndarray:
    """``counts @ linear(cells)``: raw counts where there are, else expm1 of X."""
    if "counts" in cells.layers:
        return mix_cells(cells, counts, "counts", log1p=False)
    return mix_cells(cells, counts, None, log1p=True)


def scenario_bulks(test: ad.AnnData, labels: str, left_out: str | None, seed: int):
    """(bulk AnnData, true cell share of the left-out type)."""
    rng = np.random.default_rng(seed)
    codes = test.obs[labels].cat.codes.to_numpy()
    n_types = len(test.obs[labels].cat.categories)
    if left_out is None:
        counts, _ = sample_cell_counts(codes, n_types, N_BULKS, CELLS, 1.0, rng)
        return ad.AnnData(linear_sums(test, counts), var=test.var[[]]), np.zeros(N_BULKS)
    missing = test.obs[labels].cat.categories.get_loc(left_out)
    known = np.flatnonzero(codes != missing)
    counts, _ = sample_cell_counts(codes, n_types, N_BULKS, CELLS, 1.0, rng, known)
    members = np.flatnonzero(codes == missing)
    drawn = rng.choice(members, size=(N_BULKS, CELLS))
    lacking = sp.csr_matrix(
        (np.ones(drawn.size), (np.repeat(np.arange(N_BULKS), CELLS), drawn.ravel())),
        shape=counts.shape,
    )
    share = rng.uniform(0, MAX_SHARE, N_BULKS)
    mixed = sp.diags(1 - share) @ counts + sp.diags(share) @ lacking
    return ad.AnnData(linear_sums(test, mixed.tocsr()), var=test.var[[]]), share


def cohort_unknown(bulk_cpm: np.ndarray, signature: np.ndarray, n_rounds: int = 50):
    """Not served: each sample's share of an extra non-negative profile U learned from the
    cohort (Poisson-like gene weights; U and the coefficients by alternating least squares)."""
    weights = 1.0 / (bulk_cpm.mean(axis=0) + 10.0)
    coef = weighted_coefficients(bulk_cpm, signature, weights)
    unknown = np.clip(bulk_cpm - coef @ signature.T, 0, None).mean(axis=0) + 1e-3
    for _ in range(n_rounds):
        unknown *= 1e6 / unknown.sum()
        coef = weighted_coefficients(bulk_cpm, np.column_stack([signature, unknown]), weights)
        share = coef[:, -1]
        if share @ share <= 0:
            break
        residual = bulk_cpm - coef[:, :-1] @ signature.T
        unknown = np.clip(share @ residual / (share @ share), 0, None)
    unknown *= 1e6 / unknown.sum()
    coef = weighted_coefficients(bulk_cpm, np.column_stack([signature, unknown]), weights)
    return coef[:, -1] / coef.sum(axis=1)


def train(ref: ad.AnnData, labels: str, seed: int) -> hpvade.HPVADE:
    scvi.settings.seed = seed
    layer = "counts" if "counts" in ref.layers else None
    hpvade.HPVADE.setup_anndata(ref, labels_key=labels, counts_layer=layer)
    model = hpvade.HPVADE(ref)
    model.train(enable_progress_bar=False)
    return model


def readings(model: hpvade.HPVADE, bulk: ad.AnnData) -> dict:
    """The unknown fraction, the flag and the warning of one call; the cohort fit."""
    served = bulk.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.get_proportions(served)
    warned = any("not explained by the reference" in str(w.message) for w in caught)
    estimator = model.estimator()
    genes = (model.var_names, estimator.signature, estimator.fit_genes, model.selected_genes_)
    prepared = prepare_bulk(bulk.copy(), None, *genes)
    cpm, found = prepared.cpm, prepared.found
    signature = model.get_signature().to_numpy()
    fit, unexplained = (served.obs[f"hpvade_{k}"] for k in ("fit_score", "unexplained_score"))
    return {
        "hpvade": served.obs["hpvade_unknown_lower_bound"].to_numpy(),
        "cohort fit (not served)": cohort_unknown(cpm[:, found], signature[found]),
        "flagged": served.obs["hpvade_unexplained"].mean(),
        "warned": warned,
        "fit ~ unexplained": spearmanr(fit, unexplained)[0],
    }


def scenario_rows(name: str, seeds: list[int]) -> list[dict]:
    cells = load_cells(name)
    labels = LABELS[name]
    rows = []
    for seed in seeds:
        ref, test = hpvade.datasets.split_by_type(cells, labels, fraction=0.5, seed=seed)
        complete = None
        for left_out in [None, *LEFT_OUT[name]]:
            reference = ref
            if left_out is not None:
                reference = ref[ref.obs[labels] != left_out].copy()
                reference.obs[labels] = reference.obs[labels].cat.remove_unused_categories()
            model = train(reference.copy(), labels, seed)
            if complete is None:  # the first model: the complete reference's
                complete = model
            bulk, share = scenario_bulks(test, labels, left_out, seed + 100)
            read = readings(model, bulk)
            if left_out is not None:
                rows += mapped_and_added_back(model, complete, bulk, share, left_out, seed, name)
            for method in ("hpvade", "cohort fit (not served)"):
                estimate = read[method]
                rows.append(
                    {"reference": name, "left out": left_out or "(none)", "method": method,
                     "seed": seed, "MAE": np.abs(estimate - share).mean(),
                     "median": np.median(estimate),
                     "Spearman": spearmanr(estimate, share)[0] if left_out else np.nan,
                     "slope": np.polyfit(share, estimate, 1)[0] if left_out else np.nan,
                     "flagged": read["flagged"], "warned": read["warned"],
                     "fit ~ unexplained": read["fit ~ unexplained"]}
                )  # fmt: skip
            print(f"{name} without {left_out} seed {seed}: {rows[-2]}", flush=True)
    return rows


def mapped_and_added_back(model, complete, bulk, share, left_out, seed, name) -> list[dict]:
    """The score's map to u from 10 measured bulks, and the complete reference's estimate."""
    measured = np.where(np.arange(len(share)) < N_MEASURED, share, np.nan)
    served = bulk.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = model.get_proportions(served, unknown_share=measured)
        added = complete.get_proportions(bulk.copy())[left_out].to_numpy()
    fitted = served.uns["hpvade_unknown_map"]
    rest = slice(N_MEASURED, None)
    key = {"reference": name, "left out": left_out, "seed": seed}
    score = served.obs["hpvade_unknown_lower_bound"].to_numpy()
    floor = IsotonicRegression(out_of_bounds="clip").fit(score, share).predict(score)
    return [
        {**key, "method": f"best monotone map, fitted on all {N_BULKS} (in-sample floor)",
         "MAE": np.abs(floor - share).mean()},
        {**key, "method": f"map from {N_MEASURED} measured (LOO)", "MAE": fitted["loo_error"],
         "served": fitted["served"]},
        {**key, "method": f"cohort mean of {N_MEASURED} measured (LOO)",
         "MAE": fitted["loo_error_mean"]},
        {**key, "method": f"map from {N_MEASURED} measured, the other bulks",
         "MAE": np.abs(whole["unknown"].to_numpy()[rest] - share[rest]).mean(),
         "Spearman": spearmanr(whole["unknown"].to_numpy()[rest], share[rest])[0]},
        {**key, "method": "type added back to the reference", "MAE": np.abs(added - share).mean(),
         "Spearman": spearmanr(added, share)[0], "median": np.median(added)},
    ]  # fmt: skip


def racle_whole_sample(model, frame: pd.DataFrame, flow: pd.DataFrame, seed: int) -> list[dict]:
    """Racle given its true unknown share: the measured types' fractions of the whole sample,
    and the fractions of the known cells, each against the flow figures (of all cells)."""
    import real

    bulk = ad.AnnData(frame[model.adata.var_names].astype(np.float32))
    share = (flow["Cancer_cells"] + flow["other_cells"]).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        known = model.get_proportions(bulk.copy())
        whole = model.get_proportions(bulk.copy(), unknown_share=share)
    true = flow[list(real.RACLE_TYPES)].to_numpy()
    rows = []
    for method, props in (("whole sample (true share given)", whole),
                          ("known cells only", known)):  # fmt: skip
        pred = np.column_stack([props[v].sum(axis=1) for v in real.RACLE_TYPES.values()])
        rows.append({"method": method, "seed": seed,
                     "r": np.corrcoef(pred.ravel(), true.ravel())[0, 1],
                     "RMSE": np.sqrt(np.mean((pred - true) ** 2))})  # fmt: skip
    return rows


def real_rows(seeds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    import real

    bulks = real.load_bulks(DATA)
    genes = None
    for frame, _ in bulks.values():
        genes = frame.columns if genes is None else genes.intersection(frame.columns)
    ref = real.load_reference(DATA, genes)
    facs = {
        "Finotello (4 donors)": pd.read_csv(DATA / "finotello_dev_facs.csv", index_col=0),
        real.RACLE: pd.read_csv(DATA / "racle_ln_facs.csv", index_col=0),
    }
    truth = {
        "Finotello (4 donors)": lambda f: f["Neutrophils"] + f["Other"],
        real.RACLE: lambda f: f["Cancer_cells"] + f["other_cells"],
    }
    rows, racle = [], []
    for seed in seeds:
        model = train(ref.copy(), real.LABELS, seed)
        frame = bulks[real.RACLE][0]
        racle += racle_whole_sample(model, frame, facs[real.RACLE].loc[frame.index], seed)
        for name, (frame, _) in bulks.items():
            bulk = ad.AnnData(frame[ref.var_names].astype(np.float32))
            read = readings(model, bulk)
            true = (
                truth[name](facs[name].loc[frame.index]).to_numpy()
                if name in truth
                else np.zeros(len(frame))
            )
            for i, sample in enumerate(frame.index):
                rows.append(
                    {"data": name, "sample": sample, "seed": seed, "truth": true[i],
                     "hpvade": read["hpvade"][i],
                     "cohort fit (not served)": read["cohort fit (not served)"][i],
                     "flagged": read["flagged"], "warned": read["warned"]}
                )  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(racle)


def spread(values: pd.Series, signed: bool = False) -> str:
    v = np.sort(values.dropna().to_numpy(dtype=float))
    if v.size == 0:
        return ""
    f = "{:+.3f}" if signed else "{:.3f}"
    return " / ".join(f.format(x) for x in (v.min(), np.median(v), v.max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(HERE / "results" / "unknown.md"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    produced_by = stamp()  # the code that runs, before any edit during the run
    warnings.filterwarnings("ignore", message="Forward slashes")
    logging.getLogger("scvi").setLevel(logging.WARNING)
    rows = []
    for name in LEFT_OUT:
        rows += scenario_rows(name, seeds)
    table = pd.DataFrame(rows)
    groups = table.groupby(["reference", "left out", "method"], sort=False)
    scored = table[~table["method"].str.contains("measured|added back|floor")]
    groups = scored.groupby(["reference", "left out", "method"], sort=False)
    summary = groups[["MAE", "Spearman", "slope", "median", "flagged"]].agg(spread)
    summary["warned (seeds)"] = groups["warned"].sum().astype(int)
    misfit = scored[scored["method"] == "hpvade"].groupby(["reference", "left out"], sort=False)
    misfit = misfit[["fit ~ unexplained"]].agg(spread)
    known = table[table["method"].str.contains("measured|added back|floor")]
    served = known.groupby(["reference", "left out", "method"], sort=False)
    better = served[["MAE", "Spearman", "median"]].agg(spread)
    better["map served (seeds)"] = served["served"].sum().astype(int)
    better.loc[~better.index.get_level_values(2).str.contains("LOO"), "map served (seeds)"] = ""
    real_table, racle = real_rows(seeds)
    racle_summary = racle.groupby("method", sort=False)[["r", "RMSE"]].agg(spread)
    real_summary = real_table.groupby(["data", "sample"], sort=False).agg(
        truth=("truth", "first"),
        hpvade=("hpvade", spread),
        cohort=("cohort fit (not served)", spread),
    )
    real_summary.columns = ["truth", "hpvade", "cohort fit (not served)"]
    lines = [
        "# Content the reference lacks (`benchmarks/unknown.py`)",
        "",
        f"Produced by `benchmarks/unknown.py` at {produced_by}, seeds {args.seeds}; figures are "
        "min / median / max over seeds (each seed: its own split, bulks and model).",
        "",
        "## Pseudobulks: a reference without one type",
        "",
        f"{N_BULKS} bulks per case; the left-out type's cells at u ~ U(0, {MAX_SHARE}) of each "
        "bulk's cells; `(none)`: the complete reference, u = 0. MAE, Spearman and slope of the "
        "reading against u; median: the median reading; flagged: share of samples flagged "
        '(`obs["hpvade_unexplained"]`); warned: seeds in which `get_proportions` warned.',
        "",
        summary.reset_index().to_markdown(index=False),
        "",
        "## What the user can bring: a few measured shares, or the missing type",
        "",
        f"The same bulks. The map from the score to u fitted on the first {N_MEASURED} bulks "
        "with u given (`get_proportions(unknown_share=...)`): its leave-one-out MAE beside "
        "the cohort mean's, whether it was served (seeds), and the MAE and Spearman of what "
        f"it serves for the other {N_BULKS - N_MEASURED}. The floor: a monotone map "
        f"(isotonic least squares) fitted to all {N_BULKS} bulks and scored on the same bulks, "
        "an optimistic bound on what any monotone map from this score reaches. The type "
        "added back: the complete "
        "reference's model (same seed) and its estimate of the type's cell share.",
        "",
        better.reset_index().to_markdown(index=False),
        "",
        "## Two misfit scores",
        "",
        'Spearman, across the bulks of each case, between `obs["hpvade_fit_score"]` (both '
        'directions) and `obs["hpvade_unexplained_score"]` (expression the fit falls short '
        "of only).",
        "",
        misfit.reset_index().to_markdown(index=False),
        "",
        "## Racle lymph nodes given their true unknown share",
        "",
        "The four measured types (B, CD4 T, CD8 T, NK cells) as fractions of all cells, "
        "against flow cytometry (of all cells): from `get_proportions(unknown_share=...)` "
        "with the measured cancer + other share, and the fractions of the known cells "
        "(without it). r and RMSE over samples × types.",
        "",
        racle_summary.reset_index().to_markdown(index=False),
        "",
        "## Real bulk, Hao reference",
        "",
        "Truth: Racle, cancer + other cells; Finotello, neutrophils + other; Hoek, 0 (its five "
        "measured types sum to 1).",
        "",
        real_summary.reset_index().to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
