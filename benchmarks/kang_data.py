"""Kang 2018 (control vs interferon-beta PBMCs): a reference from two donors and bulks of the
third donor's cells whose types are stimulated at their own shares, with per-type truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
KANG = HERE / "data" / "kang2018_3donors_ctrl_stim.h5ad"
KANG_SHARED = HERE.parents[1] / "shared" / "data" / "kang" / "kang2018_3donors_ctrl_stim.h5ad"
LABELS = "cell_type"
BULK_DONOR = "1015"
#: The donors, each in turn the bulk donor (the other two the reference) in a rotation.
DONORS = ("1015", "101", "107")
#: Genes detected in at least this share of all cells.
MIN_DETECTION = 0.02
#: Scored types need this many cells of each condition in the bulk donor (cells are drawn
#: with replacement; the truth is the cells drawn). 25 lets every rotation score 4-7 types.
MIN_SCORED_CELLS = 25


@dataclass
class KangBulks:
    """Simulated bulks of one donor with per-(sample, type) truth."""

    counts: pd.DataFrame  # samples × genes, summed counts
    fractions: pd.DataFrame  # samples × types, cell fractions
    stim_share: pd.DataFrame  # samples × types, u_k
    truth: dict[str, pd.DataFrame]  # type -> samples × genes CPM of the cells that went in
    scored: list[str]
    rna_fractions: pd.DataFrame  # samples × types, share of the bulk's counts


def load_kang() -> ad.AnnData:
    path = KANG if KANG.exists() else KANG_SHARED
    adata = ad.read_h5ad(path)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)  # the vendored copy stores integers
    detected = np.asarray((adata.X > 0).mean(axis=0)).ravel() >= MIN_DETECTION
    adata = adata[:, detected].copy()
    adata.obs["donor"] = adata.obs["donor"].astype(str)
    return adata


def reference(
    adata: ad.AnnData, control_only: bool = False, bulk_donor: str = BULK_DONOR
) -> ad.AnnData:
    """Cells of the other donors, normalised as a user would, counts kept in a layer."""
    keep = adata.obs["donor"] != bulk_donor
    if control_only:
        keep &= adata.obs["condition"] == "ctrl"
    ref = adata[keep.to_numpy()].copy()
    ref.layers["counts"] = ref.X.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    ref.obs[LABELS] = ref.obs[LABELS].astype(str).astype("category")
    return ref


def simulate_bulks(
    adata: ad.AnnData,
    n_bulks: int = 200,
    cells_per_bulk: int = 1000,
    shared_share: bool = False,
    seed: int = 0,
    bulk_donor: str = BULK_DONOR,
    control_only: bool = False,
) -> KangBulks:
    """Bulks of the bulk donor's cells: Dirichlet(1) type fractions, each type's cells
    stimulated at its own share u_k ~ U(0, 1) (one u per sample with ``shared_share``; none
    with ``control_only``: the samples differ by composition and donor only)."""
    rng = np.random.default_rng(seed)
    donor = adata[(adata.obs["donor"] == bulk_donor).to_numpy()]
    types = sorted(donor.obs[LABELS].astype(str).unique())
    cell_type = donor.obs[LABELS].astype(str).to_numpy()
    stim = (donor.obs["condition"] == "stim").to_numpy()
    fractions = rng.dirichlet(np.ones(len(types)), size=n_bulks)
    n_cells = rng.multinomial(cells_per_bulk, fractions)
    share = rng.random((n_bulks, len(types)))
    if shared_share:
        share[:] = share[:, :1]
    if control_only:
        share[:] = 0.0
    n_stim = rng.binomial(n_cells, share)
    rows, cols, type_of = [], [], []
    for k, name in enumerate(types):
        pools = (
            np.flatnonzero((cell_type == name) & ~stim),
            np.flatnonzero((cell_type == name) & stim),
        )
        for s in range(n_bulks):
            for pool, n in ((pools[0], n_cells[s, k] - n_stim[s, k]), (pools[1], n_stim[s, k])):
                if n == 0:
                    continue
                if pool.size == 0:  # no cell of this condition: the other condition stands in
                    pool = pools[0] if pool is pools[1] else pools[1]
                picked = rng.choice(pool, size=n, replace=True)
                rows.append(np.full(n, s))
                cols.append(picked)
                type_of.append(np.full(n, k))
    rows, cols, type_of = map(np.concatenate, (rows, cols, type_of))
    x = sp.csr_matrix(donor.X)
    genes = donor.var_names
    index = pd.Index([f"bulk_{i}" for i in range(n_bulks)])
    draws = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n_bulks, donor.n_obs))
    counts = pd.DataFrame(np.asarray((draws @ x).todense()), index, genes)
    truth, rna = {}, np.zeros((n_bulks, len(types)))
    for k, name in enumerate(types):
        mask = type_of == k
        per_type = sp.csr_matrix(
            (np.ones(mask.sum()), (rows[mask], cols[mask])), shape=(n_bulks, donor.n_obs)
        )
        summed = np.asarray((per_type @ x).todense())
        totals = summed.sum(axis=1, keepdims=True)
        rna[:, k] = totals[:, 0]
        truth[name] = pd.DataFrame(
            np.divide(summed * 1e6, totals, out=np.zeros_like(summed), where=totals > 0),
            index,
            genes,
        )
    counts_by_condition = pd.crosstab(donor.obs[LABELS].astype(str), donor.obs["condition"])
    scored = [t for t in types if (counts_by_condition.loc[t] >= MIN_SCORED_CELLS).all()]
    return KangBulks(
        counts,
        pd.DataFrame(n_cells / cells_per_bulk, index, types),
        pd.DataFrame(share, index, types),
        truth,
        scored,
        pd.DataFrame(rna / rna.sum(axis=1, keepdims=True), index, types),
    )


def reference_condition_profiles(ref: ad.AnnData) -> dict[str, np.ndarray]:
    """CPM of each (type, condition) of the reference's counts: the ceiling's profiles."""
    out = {}
    for condition in ("ctrl", "stim"):
        cells = (ref.obs["condition"] == condition).to_numpy()
        sub = ref[cells]
        codes = sub.obs[LABELS].cat.codes.to_numpy()
        indicator = sp.csr_matrix(
            (np.ones(codes.size), (codes, np.arange(codes.size))),
            shape=(len(ref.obs[LABELS].cat.categories), codes.size),
        )
        summed = np.asarray((indicator @ sp.csr_matrix(sub.layers["counts"])).todense())
        totals = summed.sum(axis=1, keepdims=True)
        out[condition] = np.divide(
            summed * 1e6, totals, out=np.zeros_like(summed), where=totals > 0
        ).T  # genes × types
    return out
