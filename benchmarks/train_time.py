"""Time of a default ``train()`` against reference size (cells × genes), on the CPU.

References: scanpy's pbmc68k (700 cells), the Hao PBMC cells on the genes the Finotello bulk
has, the Kang 2018 reference of ``expression.py`` (two donors, both conditions),
the synthetic sparse references of ``scale.py`` (10k and 100k cells × 5,000 genes) and a
small, wide one (300 cells × 28,000 genes, 6 types, 3,000 reads a cell: the VAE models 8,000
of its genes, S and the deconvolution network all of them). Each
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


WIDE = "synthetic, small and wide"


def references(sizes: list[int], only: list[str] | None = None):
    def wanted(name: str) -> bool:
        return only is None or any(word in name for word in only)

    if wanted("pbmc68k_reduced"):
        yield "pbmc68k_reduced", hpvade.datasets.pbmc68k_reference(), "bulk_labels", None
    if wanted("Hao PBMC"):
        finotello, _ = real.load_bulks(real.DATA)["Finotello (4 donors)"]
        hao = real.load_reference(real.DATA, finotello.columns)
        yield "Hao PBMC (genes shared with Finotello)", hao, real.LABELS, "counts"
    if wanted("Kang 2018"):
        kang = kang_data.reference(kang_data.load_kang())
        yield "Kang 2018 (2 donors)", kang, kang_data.LABELS, "counts"
    for n in sizes:
        if wanted(f"synthetic {n:,}"):
            yield f"synthetic {n:,}", scale.synthetic_reference(n), scale.LABELS, None
    if wanted(WIDE):
        wide = scale.synthetic_reference(300, reads_per_cell=3000.0, n_genes=28_000, n_types=6)
        yield WIDE, wide, scale.LABELS, "counts"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument(
        "--only", default=None, help="comma-separated words; references whose name has one"
    )
    parser.add_argument("--out", default=str(HERE / "results" / "train_time.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    only = args.only.split(",") if args.only else None
    for name, ref, labels, counts_layer in references(sizes, only):
        scvi.settings.seed = 0
        hpvade.HPVADE.setup_anndata(ref, labels_key=labels, counts_layer=counts_layer)
        started = time.perf_counter()
        model = hpvade.HPVADE(ref)
        model.train(enable_progress_bar=False)
        seconds = time.perf_counter() - started
        epochs = model.trainer.current_epoch
        rows.append(
            {"reference": name, "cells": ref.n_obs, "genes": ref.n_vars,
             "cell types": len(model.cell_types), "VAE genes": model.module.n_vae_genes,
             "epochs": epochs,
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
