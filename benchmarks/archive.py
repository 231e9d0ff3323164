"""Archive scale: ``get_proportions`` on cohorts of 10^5 and 10^6 samples stored in zarr and read
lazily as Dask arrays (issue "Beyond one machine").

A model is trained for one epoch on a synthetic sparse reference of 10,000 cells × 5,000 genes
and 20 types (``scale.py``). Each cohort holds the model's fitted genes only (the markers its
robust fit uses: what a user would keep of an archive), as float32 synthetic bulks (Dirichlet
mixtures of S's columns, log-normal gene noise), written block by block by Dask. Timed: the
call from the lazy AnnData to the proportions in memory, with the peak extra resident memory,
on Dask's threaded scheduler (this machine's cores), and at 10^5 also on a local
``distributed`` cluster of 2 worker processes.

Run ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/archive.py [--sizes 100000,1000000]``;
writes ``results/archive.md``. Needs ``pip install -e ".[dask]" distributed zarr``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scvi
import torch
from provenance import stamp
from scale import LABELS, Measure, synthetic_reference

import hpvade

HERE = Path(__file__).resolve().parent
#: Samples per Dask block.
BLOCK = 5_000


def write_cohort(path: Path, signature: np.ndarray, n_samples: int) -> None:
    """``n_samples`` synthetic bulks on ``signature``'s genes, as a zarr array, block by block."""

    def bulks(block_info):
        (start, stop), _ = block_info[None]["array-location"]
        rng = np.random.default_rng(start)
        mixture = rng.dirichlet(np.ones(signature.shape[1]), stop - start) @ signature.T
        return (mixture * rng.lognormal(0.0, 0.3, mixture.shape)).astype(np.float32)

    shape = (n_samples, signature.shape[0])
    lazy = da.zeros(shape, chunks=(BLOCK, shape[1]), dtype=np.float32).map_blocks(
        lambda _, block_info=None: bulks(block_info), dtype=np.float32
    )
    lazy.to_zarr(str(path), overwrite=True)


def lazy_bulk(path: Path, genes: pd.Index) -> ad.AnnData:
    values = da.from_zarr(str(path))
    obs = pd.DataFrame(index=pd.RangeIndex(values.shape[0]).astype(str))
    return ad.AnnData(values, obs=obs, var=pd.DataFrame(index=genes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--out", default=str(HERE / "results" / "archive.md"))
    args = parser.parse_args()
    produced_by = stamp()
    warnings.filterwarnings("ignore")
    sizes = [int(s) for s in args.sizes.split(",")]
    ref = synthetic_reference(10_000)
    scvi.settings.seed = 0
    hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS)
    model = hpvade.HPVADE(ref)
    model.train(max_epochs=1, enable_progress_bar=False, early_stopping=False)
    fitted = model.estimator().fit_genes
    genes = model.var_names[fitted]
    signature = model.get_signature().to_numpy()[fitted]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="hpvade-archive-"))
    try:
        for n in sizes:
            path = tmp / f"cohort_{n}.zarr"
            started = time.perf_counter()
            write_cohort(path, signature, n)
            written = time.perf_counter() - started
            bulk = lazy_bulk(path, genes)
            with dask.config.set(scheduler="threads"), Measure() as m:
                proportions = model.get_proportions(bulk)
            assert proportions.shape == (n, 20) and np.isfinite(proportions.to_numpy()).all()
            rows.append({"samples": n, "where": f"threaded scheduler, {torch.get_num_threads()} "
                         "cores", "seconds": m.seconds, "s per 10^5": m.seconds / n * 1e5,
                         "extra GB": m.extra_gb, "write s": written})  # fmt: skip
            print(rows[-1], flush=True)
            if n == sizes[0]:
                rows.append(on_cluster(model, lazy_bulk(path, genes), n))
                print(rows[-1], flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = pd.DataFrame(rows)
    lines = [
        "# Archive-scale cohorts (`benchmarks/archive.py`)",
        "",
        f"Produced by `benchmarks/archive.py` at {produced_by}. Cohorts of synthetic bulks on "
        f"the model's {len(genes):,} fitted genes (of 5,000), float32 in zarr, read lazily as "
        f"Dask arrays in blocks of {BLOCK:,} samples; a model trained one epoch on 10,000 "
        "synthetic cells × 5,000 genes, 20 types. Seconds and peak extra resident memory of "
        "`get_proportions` (lazy AnnData to the proportions in memory, every score written; on "
        "the cluster, of the client process only); write s: simulating and writing the "
        "cohort (not part of the call).",
        "",
        table.to_markdown(index=False, floatfmt=".2f"),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


def on_cluster(model, bulk: ad.AnnData, n: int) -> dict:
    """The same call on a local ``distributed`` cluster of 2 single-threaded worker processes."""
    import distributed

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
        Measure() as m,
    ):
        model.get_proportions(bulk)
    where = "local distributed cluster, 2 worker processes"
    per = m.seconds / n * 1e5
    return {"samples": n, "where": where, "seconds": m.seconds, "s per 10^5": per,
            "extra GB": m.extra_gb}  # fmt: skip


if __name__ == "__main__":
    main()
