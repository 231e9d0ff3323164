"""Each sample's cell-type-specific expression against truth (issue "The learned model earns
its place"), on Kang 2018 PBMCs (control vs interferon-beta; ``kang_data.py``).

Reference: donors 101 and 107 (both conditions, or control cells only); bulks: 200 of 1,000
cells of donor 1015, Dirichlet(1) type fractions, each type's cells stimulated at its own share
u_k ~ U(0, 1) (or one u per sample). Truth: per bulk and type, the CPM of the cells that went
in. Scored types: at least 100 cells of each condition in donor 1015.

Metrics (mean over scored types; samples with fewer than 10 cells of a type are left out of
its scores):

- per-gene r: Pearson across samples of log1p CPM, estimate vs truth, median over the 500
  genes whose truth varies most;
- response r: per gene, the slope of log1p CPM on u_k, estimate vs truth, Pearson over the
  type's 1,000 most expressed genes.

Methods, all with hpvade's proportions (``kind="rna"``): the reference profile (no variation),
allocation (each gene's bulk split in proportion to p_k S_gk), hpvade's
``get_cell_type_expression`` (and without its cohort factors: the state-aware profiles not
adapted gene by gene to the cohort), the ceiling (allocation by the reference's own control and
stimulated profiles mixed by the true u_k) and perfect states with fitted shares (those two
profiles as each type's states, their weights fitted to the bulk as hpvade fits its own: the
gap to the ceiling is the cost of not knowing u_k). ``u r``: how well the fitted state weights
track the true u_k (mean over scored types; for hpvade's own states |r|, as which state is the
stimulated one is not known). ``--ablation`` adds the method without the VAE
(states from the reference's principal components instead of its latent space) and hpvade
variants (without the VAE path, which has no cell states and serves allocation; with the
prototype loss, with the bulk reconstruction, S learned, one epoch, 400
epochs; the defaults train without the first two and with S fixed). Every case also reports
hpvade with its states used regardless of their fit (``use_states=True``), the state fit's
gain over the reference profiles (positive: the states fit the bulk better, and the default
uses them) and in how many seeds the default used them.

Run ``.venv/bin/python benchmarks/expression.py --seeds 0,1,2 [--ablation]``; writes
``results/expression.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import kang_data as kd
import numpy as np
import pandas as pd
import scvi
from provenance import stamp
from variants import VARIANTS

import hpvade
from hpvade._states import (
    MIN_STATE_FIT_GAIN,
    CellStates,
    allocate,
    cluster_states,
    cohort_type_factors,
    fit_state_weights,
    sample_profiles,
    state_profiles,
)
from hpvade.data._pseudobulk import mix_cells

HERE = Path(__file__).resolve().parent
MIN_CELLS_SCORED = 10
N_VARIABLE = 500
N_EXPRESSED = 1000
#: The ablation's row with states found without the VAE: a model built with ``use_vae=False``
#: has no cell states (get_cell_type_expression serves allocation), so here the VAE's latent
#: space is replaced by the reference's principal components (``pca_states``).
NO_VAE = "without the VAE (states from PCA)"
#: Variants trained for ``--ablation`` (the "without" rows of ``VARIANTS`` other than the VAE's
#: are the defaults now). Without the VAE path the model has no cell states and serves
#: allocation; ``NO_VAE`` shows what states from elsewhere would give.
ABLATION = ["hpvade", "without the VAE path", "with the prototype loss",
            "with the bulk reconstruction", "S learned", "1 epoch", "400 epochs"]  # fmt: skip


#: Perfect states, unknown shares: the reference's own control and stimulated profiles of each
#: type as its two states, their weights fitted to the bulk as hpvade fits its states'. The gap
#: between it and the ceiling is what fitting the shares u_k from the bulk costs.
CONDITION_STATES = "condition states, shares fitted"


def pearson(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Overall Pearson r over all (sample, type) pairs."""
    return float(np.corrcoef(estimate.ravel(), truth.ravel())[0, 1])


def score(estimates: dict[str, np.ndarray], bulks: kd.KangBulks, genes) -> tuple[float, float]:
    """(per-gene r, response r), means over the scored types."""
    if not estimates:
        return np.nan, np.nan
    per_gene, response = [], []
    for name in bulks.scored:
        keep = (bulks.fractions[name] * 1000 >= MIN_CELLS_SCORED).to_numpy()
        truth = np.log1p(bulks.truth[name][genes].to_numpy()[keep])
        estimate = np.log1p(estimates[name][keep])
        top = np.argsort(-truth.var(axis=0))[:N_VARIABLE]
        rs = [
            np.corrcoef(estimate[:, g], truth[:, g])[0, 1] if estimate[:, g].std() > 0 else 0.0
            for g in top
        ]
        per_gene.append(float(np.median(rs)))
        u = bulks.stim_share[name].to_numpy()[keep]
        centred = u - u.mean()
        slope_truth = centred @ (truth - truth.mean(0)) / (centred @ centred)
        slope_estimate = centred @ (estimate - estimate.mean(0)) / (centred @ centred)
        expressed = np.argsort(-np.expm1(truth).mean(axis=0))[:N_EXPRESSED]
        flat = np.ptp(slope_estimate[expressed]) < 1e-9  # no variation: no response
        response.append(
            0.0
            if flat
            else float(np.corrcoef(slope_estimate[expressed], slope_truth[expressed])[0, 1])
        )
    return float(np.mean(per_gene)), float(np.mean(response))


def baselines(model, ref, bulks, cpm, mixture, genes) -> dict[str, dict[str, np.ndarray]]:
    types = list(model.cell_types)
    signature = pd.DataFrame(model.reference_signature_, model.var_names, types).loc[genes]
    out = {
        "reference profile": {t: np.tile(signature[t].to_numpy(), (len(cpm), 1)) for t in types}
    }
    columns = [signature[t].to_numpy() for t in types]
    scored = [types.index(t) for t in bulks.scored]
    out["allocation"] = {types[k]: e for k, e in allocate(cpm, mixture, columns, scored).items()}
    if (ref.obs["condition"] == "stim").any():
        condition = kd.reference_condition_profiles(ref)
        share = bulks.stim_share[types].to_numpy()
        gene_rows = ref.var_names.get_indexer(genes)
        profiles = [
            (1 - share[:, [k]]) * condition["ctrl"][gene_rows, k]
            + share[:, [k]] * condition["stim"][gene_rows, k]
            for k in range(len(types))
        ]
        out["ceiling (true u_k)"] = {
            types[k]: e for k, e in allocate(cpm, mixture, profiles, scored).items()
        }
    return out


def condition_states(model, ref, bulks, cpm, mixture, genes) -> tuple[dict, float]:
    """The estimates of ``CONDITION_STATES``, and the mean over scored types of the r of
    their fitted stimulated shares with the true u_k."""
    types = list(model.cell_types)
    scored = [types.index(t) for t in bulks.scored]
    condition = kd.reference_condition_profiles(ref)
    gene_rows = ref.var_names.get_indexer(genes)
    states = CellStates(
        np.concatenate([condition["ctrl"][gene_rows], condition["stim"][gene_rows]], axis=1),
        np.tile(np.arange(len(types)), 2),
        np.full(2 * len(types), 0.5),
    )
    weights = fit_state_weights(cpm, mixture, states)
    profiles = [sample_profiles(weights, states, k) for k in range(len(types))]
    estimates = {types[k]: e for k, e in allocate(cpm, mixture, profiles, scored).items()}
    u_r = np.mean([shares_r(weights[:, len(types) + k], bulks, types[k]) for k in scored])
    return estimates, float(u_r)


def state_shares_r(model, bulks, cpm, mixture, genes) -> float:
    """For hpvade's own states (refitted as ``get_cell_type_expression`` fits them): the mean
    over scored types with two states of |r| between a state's fitted share and the true u_k
    (which of the two is the stimulated one is not known, hence |r|)."""
    types = list(model.cell_types)
    states = model.cell_states()
    rows = model.var_names.get_indexer(genes)
    states = CellStates(states.profiles[rows], states.cell_type, states.frequencies)
    weights = fit_state_weights(cpm, mixture, states)
    found = []
    for name in bulks.scored:
        members = np.flatnonzero(states.cell_type == types.index(name))
        if members.size == 2:
            found.append(abs(shares_r(weights[:, members[0]], bulks, name)))
    return float(np.mean(found)) if found else np.nan


def shares_r(fitted: np.ndarray, bulks: kd.KangBulks, name: str) -> float:
    """Pearson r of a type's fitted stimulated share with the true u_k, over the samples
    scored for the type."""
    keep = (bulks.fractions[name] * 1000 >= MIN_CELLS_SCORED).to_numpy()
    return float(np.corrcoef(fitted[keep], bulks.stim_share[name].to_numpy()[keep])[0, 1])


def pca_states(model, cpm, mixture, genes, scored) -> dict[str, np.ndarray]:
    """hpvade's method without the VAE: each type's states by k-means on the reference's 10
    principal components (scanpy, log1p X) instead of the VAE's latent space, profiles from
    the states' aggregated cells only (no decoder), adapted to the cohort as hpvade's are."""
    import scanpy as sc
    import scipy.sparse as sp

    cells = model.adata.copy()
    sc.pp.pca(cells, n_comps=10, random_state=0)
    codes = model._label_codes()
    types = list(model.cell_types)
    state_of_cell = cluster_states(cells.obsm["X_pca"], codes, len(types), seed=0)
    n_states = int(state_of_cell.max()) + 1
    state_type = np.zeros(n_states, dtype=np.int64)
    state_type[state_of_cell] = codes
    indicator = sp.csr_matrix(
        (np.ones(codes.size), (state_of_cell, np.arange(codes.size))), shape=(n_states, codes.size)
    )
    aggregated = mix_cells(model.adata, indicator, *model._linear_source())
    states = state_profiles(aggregated, aggregated, state_type, model.reference_signature_)
    rows = model.var_names.get_indexer(genes)
    states = CellStates(states.profiles[rows], states.cell_type, states.frequencies)
    weights = fit_state_weights(cpm, mixture, states)
    profiles = [sample_profiles(weights, states, k) for k in range(len(types))]
    factors = cohort_type_factors(cpm, mixture, profiles)  # as hpvade adapts its states'
    profiles = [profile * factors[:, k] for k, profile in enumerate(profiles)]
    shares = allocate(cpm, mixture, profiles, [types.index(t) for t in scored])
    return {types[k]: e for k, e in shares.items()}


#: hpvade as it was before the cohort factors (``hpvade._states.cohort_type_factors``): the
#: state-aware profiles as fitted, not adapted gene by gene to the cohort.
NO_FACTORS = "hpvade without the cohort factors"


def without_factors(model, cpm, mixture, genes, scored, states_used, allocation):
    """``NO_FACTORS``'s estimates: allocation by the state-aware profiles where the default
    uses the states, else the allocation row."""
    if not states_used:
        return allocation
    types = list(model.cell_types)
    profiles = model._state_aware_profiles(cpm, mixture, model.var_names.get_indexer(genes))
    shares = allocate(cpm, mixture, profiles, [types.index(t) for t in scored])
    return {types[k]: e for k, e in shares.items()}


#: The row with the states used whatever their fit (``use_states=True``), beside the default
#: that falls back to allocation where they fit the bulk worse than the reference profiles.
FORCED = "hpvade, states always (use_states=True)"


class _StateGain(logging.Handler):
    """Keeps the state fit's gain over the reference profiles that get_cell_type_expression
    logs."""

    gain = np.nan

    def emit(self, record):
        if record.getMessage().startswith("Cell states fit the bulk"):
            self.gain = float(record.args[0]) / 100


def run_case(ref, bulks, seed, variants, control_only):
    rows = []
    frame = bulks.counts[ref.var_names]
    for variant in variants:
        module_kwargs, epochs = VARIANTS[variant]
        scvi.settings.seed = seed
        hpvade.HPVADE.setup_anndata(ref, labels_key=kd.LABELS, counts_layer="counts")
        model = hpvade.HPVADE(ref, **module_kwargs)
        started = time.perf_counter()
        model.train(max_epochs=epochs, enable_progress_bar=False)
        trained = time.perf_counter() - started
        bulk = ad.AnnData(frame.astype(np.float32))
        mixture = model.get_proportions(bulk.copy(), kind="rna").to_numpy()
        truth = bulks.rna_fractions[list(model.cell_types)].to_numpy()
        proportions_r = {variant: pearson(mixture, truth)}
        if variant == "hpvade":
            aware = model.get_proportions(bulk.copy(), kind="rna", state_aware=True)
            proportions_r["state-aware proportions"] = pearson(aware.to_numpy(), truth)
        listener = _StateGain()
        expression_logger = logging.getLogger("hpvade.model._expression")
        expression_logger.addHandler(listener)
        expression_logger.setLevel(logging.INFO)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expression = model.get_cell_type_expression(bulk, cell_types=bulks.scored)
        seconds = time.perf_counter() - started
        expression_logger.removeHandler(listener)
        states_used = listener.gain >= MIN_STATE_FIT_GAIN  # the default's rule
        genes = expression[bulks.scored[0]].columns
        estimates = {t: e.to_numpy() for t, e in expression.items()}
        cpm = frame[genes].to_numpy(float)
        cpm = cpm / cpm.sum(axis=1, keepdims=True) * 1e6
        methods, u_r = {}, {}
        if variant == "hpvade":
            methods = baselines(model, ref, bulks, cpm, mixture, genes)
            u_r = {variant: state_shares_r(model, bulks, cpm, mixture, genes)}
            if not control_only:
                methods[CONDITION_STATES], u_r[CONDITION_STATES] = condition_states(
                    model, ref, bulks, cpm, mixture, genes
                )
            if "400 epochs" in variants:  # the ablation
                methods[NO_VAE] = pca_states(model, cpm, mixture, genes, bulks.scored)
        methods[variant] = estimates
        if variant == "hpvade":
            forced = model.get_cell_type_expression(bulk, cell_types=bulks.scored, use_states=True)
            methods[FORCED] = {t: e.to_numpy() for t, e in forced.items()}
            methods[NO_FACTORS] = without_factors(
                model, cpm, mixture, genes, bulks.scored, states_used, methods["allocation"]
            )
            methods["state-aware proportions"] = {}
        for method, est in methods.items():
            per_gene, response = score(est, bulks, genes)
            rows.append(
                {"method": method, "seed": seed, "per-gene r": per_gene, "response r": response,
                 "proportions r": proportions_r.get(method, np.nan),
                 "train s": trained if method == variant else np.nan,
                 "expression s": seconds if method == variant else np.nan,
                 "state fit gain": listener.gain if method == variant else np.nan,
                 "states used": float(states_used) if method == variant else np.nan,
                 "u r": u_r.get(method, np.nan)}
            )  # fmt: skip
            print(f"  {method:34s} seed {seed}: per-gene {per_gene:.3f} response {response:.3f}",
                  flush=True)  # fmt: skip
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """min / median / max over seeds of every metric, per case and method."""

    def spread(values):
        v = np.sort(values.dropna().to_numpy())
        if v.size == 0:
            return ""
        return f"{v.min():.3f} / {np.median(v):.3f} / {v.max():.3f}"

    metrics = ["per-gene r", "response r", "proportions r", "state fit gain", "u r"]
    groups = table.groupby(["case", "method"], sort=False)
    out = groups[metrics].agg(spread).join(groups[["states used"]].sum(min_count=1))
    out = out.join(groups[["train s"]].median().round(0))
    return out.reset_index()


def gains(table: pd.DataFrame) -> pd.DataFrame:
    """hpvade's and the ceiling's gain over allocation (same seed, same proportions)."""
    rows = []
    for (case, seed), part in table.groupby(["case", "seed"], sort=False):
        by = part.set_index("method")
        for method in [m for m in by.index if m not in ("allocation", "reference profile")]:
            if np.isnan(by.loc[method, "per-gene r"]):
                continue
            gain = by.loc[method, ["per-gene r", "response r"]] - by.loc["allocation"]
            rows.append(
                {"case": case, "method": method, "seed": seed,
                 "per-gene r gain": gain["per-gene r"], "response r gain": gain["response r"]}
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return summarise_columns(frame, ["per-gene r gain", "response r gain"])


def summarise_columns(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    def spread(values):
        v = np.sort(values.to_numpy())
        return f"{v.min():+.3f} / {np.median(v):+.3f} / {v.max():+.3f}"

    return frame.groupby(["case", "method"], sort=False)[columns].agg(spread).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "expression.md"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    produced_by = stamp()  # the code that runs, before any edit during the run
    warnings.filterwarnings("ignore")
    adata = kd.load_kang()
    cases = {
        "per-type u_k, reference with both conditions": (False, False),
        "one u per sample, reference with both conditions": (False, True),
        "per-type u_k, control-only reference": (True, False),
    }
    rows = []
    for case, (control_only, shared) in cases.items():
        ref = kd.reference(adata, control_only)
        variants = ["hpvade"]
        if args.ablation and not control_only and not shared:
            variants = ABLATION
        for seed in seeds:
            bulks = kd.simulate_bulks(adata, shared_share=shared, seed=seed)
            print(f"{case}, seed {seed}", flush=True)
            for row in run_case(ref, bulks, seed, variants, control_only):
                rows.append({"case": case, **row})
    table = pd.DataFrame(rows)
    summary = summarise(table)
    lines = [
        "# Cell-type-specific expression on Kang 2018 (`benchmarks/expression.py`)",
        "",
        f"Produced by `benchmarks/expression.py` at {produced_by}, seeds {args.seeds}; figures "
        "are min / median / max over seeds (each seed: its own bulks and model).",
        "",
        summary.to_markdown(index=False),
        "",
        "Gain over allocation with the same proportions (min / median / max over seeds; "
        "allocation is computed from each seed's own model, so only variants trained in "
        "the same run as their allocation row are compared: the ablation variants' gains "
        "are against the hpvade row's allocation):",
        "",
        gains(table).to_markdown(index=False),
        "",
        "Per seed:",
        "",
        table.round(3).to_markdown(index=False),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(summary.to_string())


if __name__ == "__main__":
    main()
