"""Does torch's OpenMP spin-waiting slow hpvade on a small or shared CPU? (issue "First contact")

Times, in fresh processes with and without ``OMP_WAIT_POLICY=PASSIVE`` (it must be set before
Python starts), an element-wise op on 128 × 6,000 values (median of 200) and 5 training epochs
on a 1,336-cell reference (the Hao cells of ``shared/data/real`` when present, else scanpy's
pbmc68k cells), once on an idle machine and once with another CPU-bound process running.
Run ``.venv/bin/python benchmarks/threads.py``; prints a table.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, logging, sys, time, warnings
warnings.simplefilter("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
import numpy as np, torch
x = torch.rand(128, 6000)
times = []
for _ in range(200):
    t = time.perf_counter(); torch.sqrt(x + 0.375); times.append(time.perf_counter() - t)
op_ms = 1000 * float(np.median(times))
import anndata as ad, scanpy as sc, scvi, hpvade
path = sys.argv[1]
if path:
    ref = ad.read_h5ad(path)
    sc.pp.normalize_total(ref); sc.pp.log1p(ref)
    ref.obs["cell_type"] = ref.obs["cell_type"].astype("category")
    labels = "cell_type"
else:
    ref, labels = hpvade.datasets.pbmc68k_reference(), "bulk_labels"
scvi.settings.seed = 0
hpvade.HPVADE.setup_anndata(ref, labels_key=labels)
model = hpvade.HPVADE(ref)
t = time.perf_counter()
model.train(max_epochs=5, enable_progress_bar=False)
print(json.dumps({"op_ms": op_ms, "train_s": time.perf_counter() - t, "shape": list(ref.shape)}))
"""


def burn(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def run(passive: bool, reference: str) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, reference], env=env, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    hao = Path(__file__).resolve().parents[2] / "shared/data/real/hao_pbmc_reference.h5ad"
    reference = str(hao) if hao.exists() else ""
    rows = []
    for loaded in (False, True):
        stop = multiprocessing.Event()
        load = multiprocessing.Process(target=burn, args=(stop,)) if loaded else None
        if load:
            load.start()
        try:
            for passive in (False, True):
                result = run(passive, reference)
                rows.append((loaded, passive, result))
        finally:
            if load:
                stop.set()
                load.join()
    print(f"reference {rows[0][2]['shape']}, {os.cpu_count()} CPU cores")
    print("| machine | OMP_WAIT_POLICY | element-wise op (ms) | 5 epochs (s) |")
    print("|---|---|---|---|")
    for loaded, passive, r in rows:
        print(
            f"| {'one other busy process' if loaded else 'idle'} | "
            f"{'PASSIVE' if passive else '(unset)'} | {r['op_ms']:.2f} | {r['train_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
