"""Time of ``get_cell_type_expression`` at 200 samples × 20,000 genes × 20 cell types, on the
CPU (issue "Cell states that help wherever they are there": ≤ 5 s on 2 cores).

A synthetic sparse reference of 4,000 cells × 20,000 genes and 20 types (``scale.py``) is
trained briefly (the time of the call does not depend on how well: the states, their fit and
the cohort factors do the same work), 200 pseudobulks are simulated from it, and the call is
timed three times after a first, warm-up call.

Run ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/expression_speed.py``; writes
``results/expression_speed.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import scale
import scvi
import torch
from provenance import stamp

import hpvade

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--types", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "results" / "expression_speed.md"))
    args = parser.parse_args()
    produced_by = stamp()
    warnings.filterwarnings("ignore")
    ref = scale.synthetic_reference(
        4000, reads_per_cell=2000.0, n_genes=args.genes, n_types=args.types
    )
    scvi.settings.seed = 0
    hpvade.HPVADE.setup_anndata(ref, labels_key=scale.LABELS, counts_layer="counts")
    model = hpvade.HPVADE(ref)
    model.train(max_epochs=2, enable_progress_bar=False)
    bulk = hpvade.pp.simulate_pseudobulk(
        ref, scale.LABELS, n_pseudobulk=args.samples, cells_per_pseudobulk=500, seed=1
    )
    model.get_cell_type_expression(bulk)  # warm-up: the cell states are computed once
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        model.get_cell_type_expression(bulk)
        seconds.append(time.perf_counter() - started)
    lines = [
        "# `get_cell_type_expression` time",
        "",
        f"Produced by `benchmarks/expression_speed.py` at {produced_by}; CPU, "
        f"{torch.get_num_threads()} threads, `OMP_WAIT_POLICY=PASSIVE`.",
        "",
        f"{args.samples} samples × {args.genes:,} genes × {args.types} cell types "
        f"({int(model.state_evidence_['n_states'].sum())} cell states): "
        f"{min(seconds):.2f} / {np.median(seconds):.2f} / {max(seconds):.2f} s "
        "(min / median / max of 3 calls, after a warm-up call that computes the states).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
