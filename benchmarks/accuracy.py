"""Accuracy benchmark: hpvade against NNLS, adaptive NNLS, the oracle, TAPE and its Scaden port.

On scanpy's real PBMCs split 50/50 by type, methods see only the reference half and every test
bulk comes from the other half (see ``scenarios.py``). Writes ``results/accuracy.md`` and
``results/accuracy.png``. Run ``bash benchmarks/run_accuracy`` (sets up TAPE) or
``python benchmarks/accuracy.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE / ".deps"))  # TAPE lives in the benchmark's own site dir

from provenance import stamp  # noqa: E402
from scenarios import MISSING_TYPE, make_scenarios, pbmc_split  # noqa: E402

import hpvade  # noqa: E402
from hpvade.data._bulk import bulk_to_cpm  # noqa: E402
from hpvade.datasets import PBMC_LABELS_KEY as LABELS  # noqa: E402

SEED = 0

#: The code that runs, stamped when the run starts (before any edit during it).
PRODUCED_BY = stamp()


# ------------------------------------------------------------------------------------ methods
def train_hpvade(ref, max_epochs=None, **module_kwargs):
    scvi.settings.seed = SEED
    ref = ref.copy()
    hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS)
    model = hpvade.HPVADE(ref, **module_kwargs)
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    return model


def hpvade_predict(model, bulk, adapt: bool):
    bulk = bulk.copy()
    if adapt:
        model = hpvade.HPVADE.load(model._saved_path, adata=model.adata)
        model.adapt(bulk)
    props = model.get_proportions(bulk)
    return props, bulk.obs["hpvade_fit_score"].to_numpy()


def nnls(ref, bulk):
    S = hpvade.pp.build_signature(ref, LABELS)
    cpm = bulk_to_cpm(bulk, S.index)
    return pd.DataFrame(
        hpvade.baselines.nnls_proportions(cpm, S), index=bulk.obs_names, columns=S.columns
    )


def adaptive_nnls(ref, bulk, n_rounds=10):
    S = hpvade.pp.build_signature(ref, LABELS)
    cpm = bulk_to_cpm(bulk, S.index)
    P, _ = hpvade.baselines.adaptive_nnls_proportions(cpm, S, n_rounds=n_rounds)
    return pd.DataFrame(P, index=bulk.obs_names, columns=S.columns)


def oracle(test, ref_types, bulk):
    S = hpvade.pp.build_signature(test, LABELS)[ref_types]
    cpm = bulk_to_cpm(bulk, S.index)
    return pd.DataFrame(
        hpvade.baselines.nnls_proportions(cpm, S), index=bulk.obs_names, columns=S.columns
    )


def _tape_single_cell(ref) -> pd.DataFrame:
    """TAPE's single-cell input: linear expression, cells × genes, indexed by type name."""
    x = ref.X.toarray() if hasattr(ref.X, "toarray") else np.asarray(ref.X)
    index = ref.obs[LABELS].astype(str).to_numpy()
    return pd.DataFrame(np.expm1(x), index=index, columns=ref.var_names)


def _tape_bulk(bulk) -> pd.DataFrame:
    """TAPE's bulk input: samples × genes."""
    return pd.DataFrame(np.asarray(bulk.X), index=bulk.obs_names, columns=bulk.var_names)


@contextlib.contextmanager
def _tape_environment():
    """TAPE 1.1.2 reloads its own pickled models with torch.load, which defaults to
    ``weights_only=True`` since torch 2.6: allow full unpickling here, in the benchmark only.
    It also writes model.pth into the working directory and prints a lot."""
    original = torch.load
    torch.load = functools.partial(original, weights_only=False)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            os.chdir(cwd)
            torch.load = original


class Peers:
    """TAPE and its Scaden port, trained once per reference with TAPE's own functions.

    ``TAPE.Deconvolution`` and ``ScadenDeconvolution`` simulate 5,000 pseudobulks and retrain on
    every call; here each reference is simulated and trained on once (as a user would) and
    every scenario is predicted from that model, which keeps the run within 30 minutes. The
    preprocessing is TAPE's (log1p, then per-sample min-max scaling) on all reference genes:
    TAPE's 2 % lowest-variance gene filter is skipped so one gene set serves every scenario.
    """

    EPOCHS = 128  # both tools' default
    ARCHITECTURES = {
        "m256": ([256, 128, 64, 32], [0, 0, 0, 0]),
        "m512": ([512, 256, 128, 64], [0, 0.3, 0.2, 0.1]),
        "m1024": ([1024, 512, 256, 128], [0, 0.6, 0.3, 0.1]),
    }

    def __init__(self, ref):
        from TAPE.model import scaden
        from TAPE.simulation import generate_simulated_data
        from TAPE.train import reproducibility, train_model

        with _tape_environment():
            simulated = generate_simulated_data(
                sc_data=_tape_single_cell(ref), samplenum=5000, sparse=True
            )
            self.genes = list(ref.var_names)
            train_x = self._scale(pd.DataFrame(simulated.X, columns=simulated.var_names))
            train_y = simulated.obs
            self.cell_types = list(train_y.columns)
            reproducibility(SEED)
            self.tape_model = train_model(
                train_x, train_y.values, batch_size=128, epochs=self.EPOCHS
            )
            self.scaden_model = scaden(
                self.ARCHITECTURES, train_x, train_y.values, batch_size=128, epochs=self.EPOCHS
            )
            self.scaden_model.train()

    def _scale(self, frame: pd.DataFrame) -> np.ndarray:
        from sklearn.preprocessing import MinMaxScaler

        logged = np.log(frame[self.genes].to_numpy(dtype=float) + 1)
        return MinMaxScaler().fit_transform(logged.T).T

    def tape(self, bulk):
        from TAPE.train import predict

        with _tape_environment():
            _, pred = predict(
                test_x=self._scale(_tape_bulk(bulk)),
                genename=self.genes,
                celltypes=self.cell_types,
                samplename=bulk.obs_names,
                model=self.tape_model,
                adaptive=True,
                mode="overall",
            )
        return pd.DataFrame(np.asarray(pred), index=bulk.obs_names, columns=self.cell_types)

    def scaden(self, bulk):
        with _tape_environment():
            pred = self.scaden_model.predict(self._scale(_tape_bulk(bulk)))
        return pd.DataFrame(np.asarray(pred), index=bulk.obs_names, columns=self.cell_types)


# ------------------------------------------------------------------------------------ running
def score(pred: pd.DataFrame, truth: pd.DataFrame) -> dict:
    pred = pred[[c for c in truth.columns if c in pred.columns]]
    return hpvade.metrics.evaluate(pred, truth.loc[pred.index, pred.columns])


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive sample scores above a negative one (Mann-Whitney AUC)."""
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def run(quick: bool, with_peers: bool, out: Path) -> pd.DataFrame:
    warnings.filterwarnings("ignore")
    ref, test = pbmc_split()
    scenarios = make_scenarios(ref, test, n_samples=60 if quick else 300)
    max_epochs = 100 if quick else None

    t = time.perf_counter()
    models = {"full": train_hpvade(ref, max_epochs)}
    models["missing"] = train_hpvade(scenarios["5 missing"].reference, max_epochs)
    train_seconds = time.perf_counter() - t
    tmp = Path(tempfile.mkdtemp())
    for key, model in models.items():
        model._saved_path = tmp / key
        model.save(model._saved_path, overwrite=True)

    peers, peer_seconds = {}, 0.0
    if with_peers:
        t = time.perf_counter()
        peers = {"full": Peers(ref), "missing": Peers(scenarios["5 missing"].reference)}
        peer_seconds = time.perf_counter() - t
        print(f"TAPE and Scaden port trained in {peer_seconds:.0f} s", flush=True)

    rows, predictions, notes = [], {}, {}
    for name, sc in scenarios.items():
        key = "missing" if name.startswith("5") else "full"
        model = models[key]
        ref_types = list(model.cell_types)
        methods = {
            "hpvade": lambda b, m=model: hpvade_predict(m, b, adapt=False),
            "hpvade + adapt": lambda b, m=model: hpvade_predict(m, b, adapt=True),
            "NNLS": lambda b, r=sc.reference: (nnls(r, b), None),
            "adaptive NNLS (10)": lambda b, r=sc.reference: (adaptive_nnls(r, b, 10), None),
            "adaptive NNLS (40)": lambda b, r=sc.reference: (adaptive_nnls(r, b, 40), None),
            "oracle NNLS": lambda b, t=ref_types: (oracle(test, t, b), None),
        }
        if with_peers:
            methods["TAPE"] = lambda b, p=peers[key]: (p.tape(b), None)
            methods["Scaden port"] = lambda b, p=peers[key]: (p.scaden(b), None)
        for method, fn in methods.items():
            start = time.perf_counter()
            try:
                pred, fit_score = fn(sc.bulk)
            except Exception as error:  # a peer failing is a result, not a crash
                rows.append({"scenario": name, "method": method, "error": repr(error)[:120]})
                print(f"{name:10s} {method:20s} FAILED {error!r}", flush=True)
                continue
            seconds = time.perf_counter() - start
            metrics = score(pred, sc.truth)
            rows.append({"scenario": name, "method": method, **metrics, "seconds": seconds})
            predictions[(name, method)] = pred
            print(
                f"{name:10s} {method:20s} r={metrics['r']:.3f} rmse={metrics['rmse']:.4f} "
                f"({seconds:.1f}s)",
                flush=True,
            )
            if name.startswith("5") and method == "hpvade" and fit_score is not None:
                missing = sc.truth[MISSING_TYPE].to_numpy()
                notes["5"] = {
                    "auc_missing_ge_20pct": auc(fit_score, missing >= 0.2),
                    "spearman_score_vs_missing": float(
                        pd.Series(fit_score).corr(pd.Series(missing), method="spearman")
                    ),
                    "error_by_type": (pred - sc.truth[pred.columns]).mean().to_dict(),
                }
    table = pd.DataFrame(rows)
    ablation = run_ablation(ref, scenarios, max_epochs, tmp)
    mode = ("quick" if quick else "full") + ("" if with_peers else ", no peers")
    write_report(table, ablation, notes, train_seconds, peer_seconds, mode, out)
    plot_figure(predictions, scenarios, table, out)
    return table


def run_ablation(ref, scenarios, max_epochs, tmp: Path) -> pd.DataFrame:
    """Overall r without each part of the model, on scenarios 1 and 6, adapted."""
    variants = {
        "full model": ({}, True),
        "without VAE path": ({"use_vae": False}, True),
        "without prototype loss": ({"prototype_weight": 0.0}, True),
        "without bulk reconstruction": ({"bulk_weight": 0.0}, True),
        "S frozen (no learning, no adaptation)": ({"learn_signature": False}, False),
        "without adaptation": ({}, False),
    }
    rows = []
    for label, (kwargs, adapt) in variants.items():
        model = train_hpvade(ref, max_epochs, **kwargs)
        model._saved_path = tmp / f"ablation_{len(rows)}"
        model.save(model._saved_path, overwrite=True)
        row = {"variant": label}
        for name in ["1 clean", "6 biovar"]:
            sc = scenarios[name]
            pred, _ = hpvade_predict(model, sc.bulk, adapt=adapt)
            row[f"r {name}"] = hpvade.metrics.pearson(pred, sc.truth)
            row[f"RMSE {name}"] = hpvade.metrics.rmse(pred, sc.truth)
        rows.append(row)
        print("ablation", row, flush=True)
    return pd.DataFrame(rows)


def write_report(table, ablation, notes, train_seconds, peer_seconds, mode, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    ok = table[table.get("error").isna()] if "error" in table else table
    wide = ok.pivot(index="method", columns="scenario", values="r").round(3)
    rmse = ok.pivot(index="method", columns="scenario", values="rmse").round(4)
    lines = [
        "# Accuracy benchmark",
        "",
        f"Produced by `benchmarks/accuracy.py` at {PRODUCED_BY}. Python "
        f"{platform.python_version()}, torch "
        f"{torch.__version__}, scvi-tools {scvi.__version__}, hpvade {hpvade.__version__}."
        f" Machine: {os.cpu_count()} CPU cores. Mode: {mode}.",
        "",
        "Data: scanpy `pbmc68k_reduced` (700 real PBMCs, 765 genes, 10 types), split 50/50 by "
        "type (seed 0). Methods see only the reference half; test bulks come only from the "
        "other half. Scenario 5 scores the nine types the reference knows. hpvade training: "
        f"{train_seconds:.0f} s for the two models (default epochs); TAPE and the Scaden port: "
        f"{peer_seconds:.0f} s to simulate and train once per reference (not in 'seconds').",
        "",
        "## Overall Pearson r",
        "",
        wide.to_markdown(),
        "",
        "## RMSE",
        "",
        rmse.to_markdown(),
        "",
        "## All metrics",
        "",
        table.round(4).to_markdown(index=False),
        "",
        "## Ablation (hpvade variants; adapted unless stated)",
        "",
        ablation.round(4).to_markdown(index=False),
        "",
    ]
    if "5" in notes:
        n5 = notes["5"]
        errors = ", ".join(f"{k}: {v:+.3f}" for k, v in n5["error_by_type"].items())
        lines += [
            "## Scenario 5: a cell type missing from the reference",
            "",
            f"Missing type: {MISSING_TYPE}. Mean signed error per known type (hpvade, "
            f"unadapted): {errors}.",
            f"Fit-quality score (`bulk.obs['hpvade_fit_score']`): AUC for samples with ≥ 20 % of "
            f"the missing type {n5['auc_missing_ge_20pct']:.3f}; Spearman with the missing "
            f"fraction {n5['spearman_score_vs_missing']:.3f}.",
            "",
        ]
    lines += ["![predicted vs true](accuracy.png)", ""]
    (out / "accuracy.md").write_text("\n".join(lines))
    print(f"wrote {out / 'accuracy.md'}")


def plot_figure(predictions, scenarios, table, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ["1 clean", "4 shift", "6 biovar", "7 small"] if n in scenarios]
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 8.4))
    axes = np.atleast_2d(axes).reshape(2, len(names))
    baselines = ["adaptive NNLS (10)", "NNLS", "Scaden port", "TAPE"]
    for j, name in enumerate(names):
        ok = table[(table.scenario == name) & table.method.isin(baselines)].dropna(subset=["r"])
        best = ok.sort_values("r").method.iloc[-1] if len(ok) else "NNLS"
        for i, method in enumerate(["hpvade + adapt", best]):
            pred = predictions.get((name, method))
            if pred is not None:
                hpvade.pl.predicted_vs_true(
                    pred, scenarios[name].truth, ax=axes[i, j], title=f"{name}: {method}"
                )
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    print(f"wrote {out / 'accuracy.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 samples, 100 epochs")
    parser.add_argument("--no-peers", action="store_true", help="skip TAPE and the Scaden port")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    run(args.quick, not args.no_peers, Path(args.out))
