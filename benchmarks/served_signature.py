"""Adapted proportions with the served S as adapt computed it (float64) against its round trip
through the module's parametrisation (log(S + 0.5), float32), side by side on the same adapted
models: the cross-dataset cohorts of ``real.py`` and the pseudobulk scenarios of
``scenarios.py``. Prints Pearson r per case and seed, and the largest change, and writes
them to ``results/served_signature.md`` with the commit they were measured at.

Run ``.venv/bin/python benchmarks/served_signature.py``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import scvi
from provenance import stamp
from real import CROSS_LABELS, DATA, cross_dataset_cohorts
from scenarios import make_scenarios, pbmc_split

import hpvade
from hpvade.datasets import PBMC_LABELS_KEY


def pearson(estimate, truth) -> float:
    return float(np.corrcoef(np.ravel(estimate), np.ravel(truth))[0, 1])


def trained(ref, labels, seed, cache: dict):
    """A default model of ``ref`` for ``seed``, trained once and saved; a fresh copy each call."""
    key = (id(ref), seed)
    if key not in cache:
        scvi.settings.seed = seed
        hpvade.HPVADE.setup_anndata(ref, labels_key=labels)
        model = hpvade.HPVADE(ref)
        model.train(enable_progress_bar=False)
        cache[key] = Path(tempfile.mkdtemp()) / "model"
        model.save(cache[key])
    return hpvade.HPVADE.load(cache[key], adata=ref)


RESULTS = Path(__file__).resolve().parent / "results" / "served_signature.md"


def compare(name, model, bulk, truth, seed, lines: list[str]):
    model.adapt(bulk.copy())
    exact = model.get_proportions(bulk.copy()).to_numpy()
    kept = model.adapted_signature_
    model.adapted_signature_ = None  # the module's round trip, as served before
    rounded = model.get_proportions(bulk.copy()).to_numpy()
    model.adapted_signature_ = kept
    columns = [list(model.cell_types).index(c) for c in truth.columns]
    r_exact, r_rounded = pearson(exact[:, columns], truth), pearson(rounded[:, columns], truth)
    change = np.abs(exact - rounded).max()
    line = (f"{name:45s} seed {seed}: r {r_rounded:.4f} -> {r_exact:.4f} "
            f"({r_exact - r_rounded:+.4f}), largest change {change:.4f}")  # fmt: skip
    print(line, flush=True)
    lines.append(line)
    return r_exact - r_rounded


def main() -> None:
    warnings.filterwarnings("ignore")
    deltas, cache, lines = [], {}, []
    for name, (ref, bulk, truth) in cross_dataset_cohorts(DATA).items():
        for seed in (0, 1, 2):
            model = trained(ref, CROSS_LABELS, seed, cache)
            deltas.append(compare(name, model, bulk, truth, seed, lines))
    reference, test = pbmc_split()
    for key, scenario in make_scenarios(reference, test).items():
        truth = scenario.truth
        if key.startswith("5"):  # the reference lacks a type: score the types it knows
            known = scenario.reference.obs[PBMC_LABELS_KEY].cat.categories
            truth = truth[list(known)]
        for seed in (0, 1, 2):
            model = trained(scenario.reference, PBMC_LABELS_KEY, seed, cache)
            deltas.append(compare(key, model, scenario.bulk, truth, seed, lines))
    deltas = np.array(deltas)
    summary = (f"r change: min {deltas.min():+.4f}, median {np.median(deltas):+.4f}, "
               f"max {deltas.max():+.4f}")  # fmt: skip
    print(summary)
    head = (
        "# Adapted proportions: the served S exact or through the module "
        "(`benchmarks/served_signature.py`)\n\n"
        f"Produced by `benchmarks/served_signature.py` at {stamp()}. Pearson r of the adapted "
        "proportions with the round trip of adapt's S through the module's parametrisation "
        "(as served before 491d520) -> with adapt's S as computed (served since), on the same "
        "adapted models; largest change of any proportion.\n"
    )
    RESULTS.write_text(head + "\n```\n" + "\n".join([*lines, summary]) + "\n```\n")


if __name__ == "__main__":
    main()
