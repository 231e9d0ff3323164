"""Time of a default ``train()`` against reference size (cells × genes), on the CPU.

References: scanpy's pbmc68k (700 cells), the Hao PBMC cells on the genes the Finotello bulk
has, the Kang 2018 reference of ``expression.py`` (two donors, both conditions),
and the synthetic sparse references of ``scale.py`` (10k and 100k cells × 5,000 genes). Each
is trained once with defaults (``max_epochs=None``); the seconds include the pseudobulk pools
and the flag's calibration.

Run ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_time.py``; writes
``results/train_time.md``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import kang_data
import pandas as pd
import real
import scale
import scvi
import torch
from provenance import stamp

import hpvade

HERE = Path(__file__).resolve().parent


def references(sizes: list[int]):
    yield "pbmc68k_reduced", hpvade.datasets.pbmc68k_reference(), "bulk_labels", None
    finotello, _ = real.load_bulks(real.DATA)["Finotello (4 donors)"]
    hao = real.load_reference(real.DATA, finotello.columns)
    yield "Hao PBMC (genes shared with Finotello)", hao, real.LABELS, "counts"
    kang = kang_data.reference(kang_data.load_kang())
    yield "Kang 2018 (2 donors)", kang, kang_data.LABELS, "counts"
    for n in sizes:
        yield f"synthetic {n:,}", scale.synthetic_reference(n), scale.LABELS, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--out", default=str(HERE / "results" / "train_time.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, ref, labels, counts_layer in references([int(s) for s in args.sizes.split(",")]):
        scvi.settings.seed = 0
        hpvade.HPVADE.setup_anndata(ref, labels_key=labels, counts_layer=counts_layer)
        started = time.perf_counter()
        model = hpvade.HPVADE(ref)
        model.train(enable_progress_bar=False)
        seconds = time.perf_counter() - started
        epochs = model.trainer.current_epoch
        rows.append(
            {"reference": name, "cells": ref.n_obs, "genes": ref.n_vars,
             "cell types": len(model.cell_types), "epochs": epochs,
             "HPVADE() + train() s": round(seconds, 1)}
        )  # fmt: skip
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    text = "\n".join(
        [
            "# Default `train()` time against reference size",
            "",
            f"Produced by `benchmarks/train_time.py` at {stamp()}; CPU, "
            f"{torch.get_num_threads()} threads, `OMP_WAIT_POLICY=PASSIVE`. Seconds from "
            "`HPVADE(ref)` (gene selection) to the end of `train()` (pools, training, the "
            "flag's calibration); one run each.",
            "",
            table.to_markdown(index=False),
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
