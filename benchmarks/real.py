"""Real bulk RNA-seq against flow cytometry (issue "Real bulk RNA-seq").

Reference: the Hao PBMC cells of ``shared/data/real`` (1,336 cells, 11 types), normalised as a
user would (``normalize_total`` + ``log1p`` into ``X``, counts in ``layers["counts"]``),
restricted to the genes every bulk data set has. Bulks: the 4 Finotello donors (TPM) and the 2
Hoek donors (read counts), scored against flow cytometry on the types truth and reference share
(Hoek's T cells = CD4 conv + Tregs + CD8), over all (donor, type) pairs, proportions as
estimated (cell fractions, ``kind="cell"``).

Methods: NNLS on the CPM signature (all genes), the plain recipe
(``hpvade.baselines.marker_recipe_proportions``), hpvade with defaults and after ``adapt`` on
each cohort (one model per seed), and Rectangle 1.7.0 with its defaults when ``--rectangle``
is given (installed into ``benchmarks/.cache/rectangle-venv``, its pins conflict with ours).

Run ``.venv/bin/python benchmarks/real.py`` (``--seeds 0,1,2``, ``--rectangle``); writes
``results/real.md`` and ``results/real.png``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import subprocess
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scvi
from provenance import stamp
from variants import VARIANTS

import hpvade
from hpvade.core import rna_to_cell_fractions
from hpvade.data._matrix import cpm_rows

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "real"  # vendored copy of the project's shared real data (data/README.md)
LABELS = "cell_type"
FINOTELLO_TYPES = ["NK cells", "B cells", "Tregs", "mDC", "Monocytes", "T cells CD8",
                   "T cells CD4 conv"]  # fmt: skip
#: Hoek's columns as sums of reference types.
HOEK_TYPES = {
    "Bcells": ["B cells"],
    "Monocytes": ["Monocytes"],
    "MyeloidDC": ["mDC"],
    "NKcells": ["NK cells"],
    "Tcells": ["T cells CD4 conv", "Tregs", "T cells CD8"],
}
RECTANGLE_VENV = HERE / ".cache" / "rectangle-venv"
#: Racle's columns as sums of reference types; scored as the relative composition of these
#: known types (cancer and other cells, 30-88 % of each node, are not in the reference).
RACLE_TYPES = {
    "Bcells": ["B cells", "Plasma cells"],
    "CD4_Tcells": ["T cells CD4 conv", "Tregs"],
    "CD8_Tcells": ["T cells CD8"],
    "NKcells": ["NK cells"],
}
RACLE = "Racle (4 lymph nodes, known types)"
#: The cross-dataset scenario's shared types, from each data set's labels.
HAO_SHARED = {"Monocytes": "Monocytes", "B cells": "B", "NK cells": "NK",
              "T cells CD4 conv": "CD4 T", "Tregs": "Treg", "T cells CD8": "CD8 T",
              "mDC": "Dendritic"}  # fmt: skip
PBMC68K_SHARED = {"CD14+ Monocyte": "Monocytes", "CD19+ B": "B", "CD56+ NK": "NK",
                  "CD4+/CD45RA+/CD25- Naive T": "CD4 T", "CD4+/CD45RO+ Memory": "CD4 T",
                  "CD4+/CD25 T Reg": "Treg", "CD8+ Cytotoxic T": "CD8 T",
                  "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T", "Dendritic": "Dendritic"}  # fmt: skip
CROSS_LABELS = "shared_type"
#: hpvade's unknown fraction per (data set, seed), filled by ``hpvade_runs``.
UNKNOWN: dict = {}
#: Seconds of each ``train`` call per (variant, seed), filled by ``hpvade_runs``.
TRAIN_SECONDS: dict = {}


def load_bulks(data: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """``name -> (bulk samples × genes, flow-cytometry truth)``."""
    finotello = pd.read_csv(data / "finotello_dev_tpm.csv.gz", index_col=0)
    facs = pd.read_csv(data / "finotello_dev_facs.csv", index_col=0).loc[finotello.index]
    hoek = pd.read_csv(data / "hoek_counts.csv.gz", index_col=0)
    hoek = hoek.T.groupby(level=0).sum().T  # duplicated symbols summed
    hoek_facs = pd.read_csv(data / "hoek_facs.csv", index_col=0).loc[hoek.index]
    racle = pd.read_csv(data / "racle_ln_tpm.csv.gz", index_col=0)
    racle_facs = pd.read_csv(data / "racle_ln_facs.csv", index_col=0).loc[racle.index]
    known = racle_facs[list(RACLE_TYPES)]
    return {
        "Finotello (4 donors)": (finotello, facs[FINOTELLO_TYPES]),
        "Hoek (2 donors)": (hoek, hoek_facs[list(HOEK_TYPES)]),
        RACLE: (racle, known.div(known.sum(axis=1), axis=0)),
    }


def load_reference(data: Path, genes: pd.Index) -> ad.AnnData:
    ref = ad.read_h5ad(data / "hao_pbmc_reference.h5ad")
    ref = ref[:, ref.var_names.isin(genes)].copy()
    ref.layers["counts"] = ref.X.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    ref.obs[LABELS] = ref.obs[LABELS].astype("category")
    return ref


def cross_dataset_cohorts(data: Path, n_bulks: int = 300) -> dict:
    """``name -> (reference, bulk AnnData, truth)`` for both directions of the cross-dataset
    scenario: Hao cells against pseudobulks of scanpy's pbmc68k cells (other donors, chemistry
    and lab), and back, on their shared genes and the 7 shared types.

    Both references are log1p-normalised without a count layer, so every method estimates
    mixture fractions; truth is the pseudobulks' mixture: cell fractions of the normalised
    pbmc68k cells (each cell the same total), RNA fractions of the Hao counts.
    """
    hao = ad.read_h5ad(data / "hao_pbmc_reference.h5ad")
    p68 = hpvade.datasets.pbmc68k_reference()
    genes = sorted(set(hao.var_names) & set(p68.var_names))
    hao = hao[hao.obs[LABELS].isin(list(HAO_SHARED)), genes].copy()
    hao.obs[CROSS_LABELS] = hao.obs[LABELS].astype(str).map(HAO_SHARED).astype("category")
    hao.layers["counts"] = hao.X.copy()
    sc.pp.normalize_total(hao)
    sc.pp.log1p(hao)
    p68 = p68[p68.obs["bulk_labels"].isin(list(PBMC68K_SHARED)), genes].copy()
    p68.obs[CROSS_LABELS] = (
        p68.obs["bulk_labels"].astype(str).map(PBMC68K_SHARED).astype("category")
    )
    to_p68 = hpvade.pp.simulate_pseudobulk(p68, CROSS_LABELS, n_pseudobulk=n_bulks, seed=7)
    to_hao = hpvade.pp.simulate_pseudobulk(
        hao, CROSS_LABELS, n_pseudobulk=n_bulks, seed=8, counts_layer="counts"
    )
    hao_ref = ad.AnnData(hao.X, obs=hao.obs[[CROSS_LABELS]], var=hao.var[[]])
    p68_ref = ad.AnnData(p68.X, obs=p68.obs[[CROSS_LABELS]], var=p68.var[[]])
    return {
        f"Hao -> pbmc68k ({n_bulks} pseudobulks)": (hao_ref, to_p68, to_p68.obsm["proportions"]),
        f"pbmc68k -> Hao ({n_bulks} pseudobulks)": (
            p68_ref,
            to_hao,
            to_hao.obsm["rna_proportions"],
        ),
    }


def cross_dataset_runs(cohorts: dict, seeds: list[int], max_epochs, variants=("hpvade",)) -> dict:
    """NNLS, the plain recipe, and hpvade before and after adapt, on both directions (the
    ablation's other variants: before adapt only)."""
    results = {}
    for name, (ref, bulk, _) in cohorts.items():
        frame = pd.DataFrame(bulk.X, bulk.obs_names, bulk.var_names)
        signature = hpvade.pp.build_signature(ref, CROSS_LABELS)
        cpm = cpm_rows(frame[signature.index].to_numpy(float), inplace=True)
        nnls = hpvade.baselines.nnls_proportions(cpm, signature)
        results[("NNLS", name, 0)] = pd.DataFrame(nnls, bulk.obs_names, signature.columns)
        results[("plain recipe", name, 0)] = hpvade.baselines.marker_recipe_proportions(
            ref, CROSS_LABELS, frame
        )
        for seed, variant in itertools.product(seeds, variants):
            module_kwargs, epochs = VARIANTS[variant]
            scvi.settings.seed = seed
            hpvade.HPVADE.setup_anndata(ref, labels_key=CROSS_LABELS)
            model = hpvade.HPVADE(ref, **module_kwargs)
            model.train(max_epochs=epochs or max_epochs, enable_progress_bar=False)
            results[(variant, name, seed)] = model.get_proportions(bulk.copy())
            if variant != "hpvade":
                continue
            results[("hpvade state-aware", name, seed)] = model.get_proportions(
                bulk.copy(), use_states=True
            )
            model.adapt(bulk.copy())
            results[("hpvade + adapt", name, seed)] = model.get_proportions(bulk.copy())
            print(f"{name} seed {seed} done", flush=True)
    return results


def to_truth_columns(props: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Estimated proportions on the truth's columns (Hoek's merged T cells summed)."""
    if list(truth.columns) == list(HOEK_TYPES) and "Tcells" not in props.columns:
        return pd.DataFrame({k: props[v].sum(axis=1) for k, v in HOEK_TYPES.items()})
    if list(truth.columns) == list(RACLE_TYPES) and "Bcells" not in props.columns:
        known = pd.DataFrame({k: props[v].sum(axis=1) for k, v in RACLE_TYPES.items()})
        return known.div(known.sum(axis=1), axis=0)  # relative composition of the known types
    return props[truth.columns]


def score(props: pd.DataFrame, truth: pd.DataFrame) -> tuple[float, float]:
    pred = to_truth_columns(props, truth).loc[truth.index].to_numpy(float)
    true = truth.to_numpy(float)
    return float(np.corrcoef(pred.ravel(), true.ravel())[0, 1]), float(
        np.sqrt(np.mean((pred - true) ** 2))
    )


def nnls_all_genes(ref: ad.AnnData, bulk: pd.DataFrame) -> pd.DataFrame:
    signature = hpvade.pp.build_signature(ref, LABELS, counts_layer="counts")
    cpm = cpm_rows(bulk[signature.index].to_numpy(float), inplace=True)
    rna = hpvade.baselines.nnls_proportions(cpm, signature)
    content = hpvade.baselines.type_rna_content(ref, LABELS, "counts")
    return pd.DataFrame(rna_to_cell_fractions(rna, content), bulk.index, signature.columns)


def rectangle(ref: ad.AnnData, bulk: pd.DataFrame, tmp: Path) -> pd.DataFrame:
    """Rectangle 1.7.0 with defaults, in its own virtual environment (made on first use)."""
    python = RECTANGLE_VENV / "bin" / "python"
    if not python.exists():  # its pins conflict with hpvade's: an environment of its own
        subprocess.run(["python3", "-m", "venv", str(RECTANGLE_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "rectanglepy==1.7.0"], check=True
        )
    counts = pd.DataFrame(ref.layers["counts"].toarray(), ref.obs_names, ref.var_names)
    counts.to_csv(tmp / "sc_counts.csv")
    ref.obs[[LABELS]].to_csv(tmp / "annotations.csv")
    bulk.to_csv(tmp / "bulk.csv")
    script = (
        "import pandas as pd, rectanglepy as rp, sys\n"
        "d = sys.argv[1]\n"
        "sc = pd.read_csv(d + '/sc_counts.csv', index_col=0)\n"
        "ann = pd.read_csv(d + '/annotations.csv', index_col=0).iloc[:, 0]\n"
        "bulk = pd.read_csv(d + '/bulk.csv', index_col=0)\n"
        "import anndata as ad\n"
        "adata = ad.AnnData(sc.astype('float32'), obs=pd.DataFrame({'cell_type': ann}))\n"
        "estimations, *_ = rp.rectangle(adata, bulk, cell_type_col='cell_type')\n"
        "estimations.to_csv(d + '/rectangle.csv')\n"
    )
    subprocess.run([str(python), "-c", script, str(tmp)], check=True)
    return pd.read_csv(tmp / "rectangle.csv", index_col=0)


def hpvade_runs(ref, bulks, seeds, max_epochs, variants=("hpvade",)):
    """Per seed: a model trained with defaults, then its proportions before and after adapt
    (the ablation's other variants: before adapt only)."""
    results = {}
    for seed, variant in itertools.product(seeds, variants):
        module_kwargs, epochs = VARIANTS[variant]
        scvi.settings.seed = seed
        hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS, counts_layer="counts")
        model = hpvade.HPVADE(ref, **module_kwargs)
        started = time.perf_counter()
        model.train(max_epochs=epochs or max_epochs, enable_progress_bar=False)
        seconds = time.perf_counter() - started
        TRAIN_SECONDS[(variant, seed)] = seconds
        print(f"{variant}, seed {seed}: trained in {seconds:.0f} s", flush=True)
        for name, (bulk, _) in bulks.items():
            adata = ad.AnnData(bulk[ref.var_names].astype(np.float32))
            served = adata.copy()
            results[(variant, name, seed)] = model.get_proportions(served)
            if variant != "hpvade":
                continue
            results[("hpvade state-aware", name, seed)] = model.get_proportions(
                adata.copy(), use_states=True
            )
            UNKNOWN[(name, seed)] = served.obs["hpvade_unknown_fraction"]
            if adata.n_obs < 3:  # adapt refuses fewer than 3 samples (Hoek has 2)
                continue
            adapted = hpvade.HPVADE.load(save(model, seed), adata=ref)
            adapted.adapt(adata)
            results[("hpvade + adapt", name, seed)] = adapted.get_proportions(adata.copy())
    return results


def save(model, seed) -> Path:
    path = HERE / ".cache" / f"real_model_{seed}"
    model.save(path, overwrite=True)
    return path


def unknown_table(data: Path) -> pd.DataFrame:
    """hpvade's unknown fraction per Finotello donor and seed, beside the measured one."""
    facs = pd.read_csv(data / "finotello_dev_facs.csv", index_col=0)
    table = pd.DataFrame({"measured": facs["Neutrophils"] + facs["Other"]})
    for (name, seed), unknown in UNKNOWN.items():
        if name.startswith("Finotello"):
            table[f"hpvade seed {seed}"] = unknown.reindex(table.index)
    return table.round(3)


def figure(results, truths, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({key[0] for key in results})
    fig, axes = plt.subplots(
        len(truths), len(methods), figsize=(3 * len(methods), 3 * len(truths))
    )
    axes = np.atleast_2d(axes)
    for i, (name, truth) in enumerate(truths.items()):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            for key, props in results.items():
                if key[0] == method and key[1] == name:
                    pred = to_truth_columns(props, truth).loc[truth.index]
                    for column in truth.columns:
                        ax.scatter(truth[column], pred[column], s=12, label=column)
                    break
            if not ax.collections:
                ax.text(0.05, 0.5, "not run", fontsize=7)
            ax.plot([0, 0.7], [0, 0.7], color="grey", lw=0.5)
            ax.set_title(f"{method}\n{name}", fontsize=8)
            ax.set_xlabel("truth", fontsize=7)
            ax.set_ylabel("estimated", fontsize=7)
        axes[i, -1].legend(fontsize=5)  # each data set has its own type names
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--rectangle", action="store_true")
    parser.add_argument("--no-cross", action="store_true", help="skip the cross-dataset part")
    parser.add_argument(
        "--variants",
        default="hpvade",
        help=f"comma-separated model variants (the ablation): {', '.join(VARIANTS)}",
    )
    parser.add_argument("--output", default=str(HERE / "results" / "real.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = Path(args.data)
    bulks = load_bulks(data)
    genes = pd.Index(sorted(set.intersection(*(set(b.columns) for b, _ in bulks.values()))))
    ref = load_reference(data, genes)
    print(f"reference {ref.n_obs} cells x {ref.n_vars} genes shared with every bulk", flush=True)
    results = {}
    for name, (bulk, _) in bulks.items():
        results[("NNLS", name, 0)] = nnls_all_genes(ref, bulk)
        results[("plain recipe", name, 0)] = hpvade.baselines.marker_recipe_proportions(
            ref, LABELS, bulk[ref.var_names], counts_layer="counts"
        )
        if args.rectangle:
            tmp = HERE / ".cache" / "rectangle_io"
            tmp.mkdir(parents=True, exist_ok=True)
            results[("Rectangle 1.7.0", name, 0)] = rectangle(ref, bulk[ref.var_names], tmp)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results.update(hpvade_runs(ref, bulks, seeds, args.max_epochs, variants))
    truths = {name: truth for name, (_, truth) in bulks.items()}
    if not args.no_cross:
        cohorts = cross_dataset_cohorts(data)
        truths.update({name: truth for name, (_, _, truth) in cohorts.items()})
        results.update(cross_dataset_runs(cohorts, seeds, args.max_epochs, variants))

    rows = []
    for (method, name, seed), props in results.items():
        r, rmse = score(props, truths[name])
        rows.append({"method": method, "data": name, "seed": seed, "r": r, "rmse": rmse})
        print(f"{method:18s} {name:22s} seed {seed}: r {r:.3f} RMSE {rmse:.3f}", flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby(["data", "method"]).agg(
        r_min=("r", "min"), r_median=("r", "median"), r_max=("r", "max"),
        rmse_median=("rmse", "median"), runs=("seed", "size"),
    ).round(3)  # fmt: skip
    text = "\n".join(
        [
            "# Real bulk RNA-seq against flow cytometry",
            "",
            f"Produced by `benchmarks/real.py` at {stamp()}.",
            "",
            f"Reference: Hao PBMC, {ref.n_obs} cells x {ref.n_vars} genes (shared with every "
            f"bulk). hpvade seeds: {seeds}; default epochs unless stated "
            f"(max_epochs={args.max_epochs}).",
            "",
            summary.to_markdown(),
            "",
            "## Train time (Hao reference, seconds per `train` call)",
            "",
            pd.Series(TRAIN_SECONDS, name="seconds")
            .round(1)
            .rename_axis(["variant", "seed"])
            .to_frame()
            .to_markdown(),
            "",
            "## Unknown content (Finotello: flow cytometry's neutrophils + other)",
            "",
            unknown_table(data).to_markdown(),
            "",
            "## Every run",
            "",
            table.round(3).to_markdown(index=False),
            "",
        ]
    )
    Path(args.output).write_text(text)
    figure(results, truths, Path(args.output).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
