"""Scale benchmark: hpvade's hot paths on synthetic sparse references of 10k, 100k and 1M cells.

For each size it times (and tracks the peak extra resident memory of) ``build_signature``,
``simulate_pseudobulk`` of 10,000 samples × 500 cells, one training epoch and
``get_proportions`` on 10,000 bulk samples, and on backed cohorts of 20,000 and 200,000
samples; in the same run it times the straightforward
versions a first prototype would write (a Python loop over types on a dense copy; a loop over
samples with ``np.random.choice`` and a dense row sum) where they fit in memory, and one epoch of
``scvi.model.SCVI`` on the same cells. Writes ``results/scale.md``.

Run ``.venv/bin/python benchmarks/scale.py`` (about 25 minutes on 2 cores; ``--sizes 10000``
for a quick look).
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch
from provenance import stamp

import hpvade

HERE = Path(__file__).resolve().parent
#: The code that runs, stamped when the run starts (before any edit during it).
PRODUCED_BY = stamp()
LABELS = "cell_type"
N_GENES, N_TYPES = 5_000, 20
N_BULK, CELLS_PER_BULK = 10_000, 500
#: Largest reference the straightforward versions get (their dense copy is cells × 5k float32).
NAIVE_MAX_CELLS = 100_000
#: Training epochs are timed this many times (alternating hpvade and SCVI); the best counts.
REPEATS = 2
SIGNATURE, NAIVE_SIGNATURE = "build_signature", "naive signature (dense, loop over types)"
SIMULATE = f"simulate_pseudobulk {N_BULK:,} x {CELLS_PER_BULK}"
NAIVE_SIMULATE = f"naive pseudobulk (loop over {N_BULK:,} samples)"
#: Epochs of the whole-train comparison (issue "Architecture": 3 epochs at 100k cells).
EPOCHS = 3
EPOCH = f"hpvade train, {EPOCHS} epochs"
SCVI_EPOCH = f"scvi.model.SCVI train, {EPOCHS} epochs"
POOLS, CALIBRATION = "hpvade fixed cost: pseudobulk pools", "hpvade fixed cost: calibrations"
PROPORTIONS = f"get_proportions on {N_BULK:,} bulks"
#: Cohort sizes of the backed measurement (``--backed-sizes``), and the samples written per block.
BACKED_SIZES = "20000,200000"
WRITE_BLOCK = 10_000


# ---------------------------------------------------------------------------------- the data
def synthetic_reference(
    n_cells: int,
    seed: int = 0,
    reads_per_cell: float = 350.0,
    n_genes: int = N_GENES,
    n_types: int = N_TYPES,
) -> ad.AnnData:
    """Sparse reference: 20 types (``n_types``) with distinct gamma-distributed mean profiles
    over 5,000 genes (``n_genes``).

    Each cell's library size is negative binomial (gamma-Poisson, shape 4, mean
    ``reads_per_cell``); its reads are multinomial over its type's profile, so counts are
    Poisson given the library and about 5 % of entries are non-zero. Raw counts go to
    ``layers["counts"]``; X holds ``normalize_total(target_sum=1e4)`` + ``log1p``, computed on
    the sparse values directly. Built in chunks of 100k cells, never dense.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.3, 1.0, n_genes)
    profiles = base[None] * rng.lognormal(0.0, 1.0, (n_types, n_genes))
    cumulative = np.cumsum(profiles / profiles.sum(1, keepdims=True), axis=1)
    types = rng.integers(0, n_types, n_cells)
    counts_blocks = []
    for start in range(0, n_cells, 100_000):
        chunk_types = types[start : start + 100_000]
        library = rng.poisson(rng.gamma(4.0, reads_per_cell / 4.0, chunk_types.size))
        cell_of_read = np.repeat(np.arange(chunk_types.size), library)
        type_of_read = chunk_types[cell_of_read]
        uniform = rng.random(cell_of_read.size)
        gene_of_read = np.empty(cell_of_read.size, np.int64)
        for t in range(n_types):  # a loop over types, not over cells
            reads = type_of_read == t
            gene_of_read[reads] = np.searchsorted(cumulative[t], uniform[reads])
        np.minimum(gene_of_read, n_genes - 1, out=gene_of_read)
        block = sp.csr_matrix(
            (np.ones(cell_of_read.size, np.float32), (cell_of_read, gene_of_read)),
            shape=(chunk_types.size, n_genes),
        )
        block.sum_duplicates()
        counts_blocks.append(block)
    counts = sp.vstack(counts_blocks, format="csr")
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(totals, 1)
    X = counts.copy()
    X.data = np.log1p(X.data * np.repeat(scale, np.diff(X.indptr))).astype(np.float32)
    obs = pd.DataFrame(
        {LABELS: pd.Categorical([f"type_{t:02d}" for t in types])},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var, layers={"counts": counts})


def csr_bytes(matrix: sp.csr_matrix) -> int:
    return matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes


# ----------------------------------------------------------------------------- measurement
class Measure:
    """Wall seconds and peak extra resident memory (sampled every 5 ms) of a block."""

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self._stop = False
        self.base = self.peak = self.rss()

        def sample():
            while not self._stop:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        self._stop = True
        self._thread.join()
        self.extra_gb = (max(self.peak, self.rss()) - self.base) / 1e9
        return False


def best(runs: list[Measure]) -> Measure:
    """The fastest run (its peak memory is the largest of all runs)."""
    fastest = min(runs, key=lambda m: m.seconds)
    fastest.extra_gb = max(m.extra_gb for m in runs)
    return fastest


def runs_text(runs: list[Measure]) -> str:
    return " / ".join(f"{m.seconds:.2f}" for m in runs)


# ------------------------------------------------------------------ straightforward versions
def naive_signature(adata: ad.AnnData) -> np.ndarray:
    """A first prototype's signature: dense copy, then a Python loop over types."""
    dense = np.expm1(adata.X.toarray())
    codes = adata.obs[LABELS].cat.codes.to_numpy()
    aggregate = np.stack([dense[codes == t].sum(axis=0) for t in range(N_TYPES)], axis=1)
    return aggregate / aggregate.sum(axis=0) * 1e6


def naive_pseudobulk(adata: ad.AnnData, n_samples: int, seed: int = 0) -> np.ndarray:
    """A first prototype's simulation: per sample, np.random.choice per type on a dense copy."""
    rng = np.random.default_rng(seed)
    dense = np.expm1(adata.X.toarray())
    codes = adata.obs[LABELS].cat.codes.to_numpy()
    members = [np.flatnonzero(codes == t) for t in range(N_TYPES)]
    out = np.zeros((n_samples, adata.n_vars))
    for i in range(n_samples):
        numbers = rng.multinomial(CELLS_PER_BULK, rng.dirichlet(np.ones(N_TYPES)))
        cells = np.concatenate([rng.choice(m, k) for m, k in zip(members, numbers, strict=True)])
        out[i] = dense[cells].sum(axis=0)
    return out / out.sum(axis=1, keepdims=True) * 1e6


# ------------------------------------------------------------------------------- training
def hpvade_training(adata: ad.AnnData) -> hpvade.HPVADE:
    hpvade.HPVADE.setup_anndata(adata, labels_key=LABELS)
    model = hpvade.HPVADE(adata)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False, early_stopping=False)
    return model


def scvi_training(adata: ad.AnnData) -> None:
    scvi.model.SCVI.setup_anndata(adata, layer="counts")
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False)


def fixed_costs(model: hpvade.HPVADE) -> tuple[Measure, Measure]:
    """Re-run what every ``train`` call adds besides its epochs: the two pseudobulk pools
    (4,000 + 800 pseudobulks of 500 cells) and the calibration ``train`` runs (the flag's;
    the intervals calibrate on their first use)."""
    cells = np.arange(model.adata.n_obs)
    with Measure() as pools:
        model.simulator.pool(cells, 4000, 0)  # train's pseudobulk settings: 500 cells, alpha 1
        model.simulator.pool(cells, 800, 1)
    model.signature_ratios_ = None
    with Measure() as calibration:
        model.calibrate_unexplained()
    return pools, calibration


def run_size(n_cells: int, epochs: bool, naive: bool = True, repeats: int = REPEATS) -> list[dict]:
    rows = []

    def record(step, m, extra=None):
        row = {"cells": n_cells, "step": step, "seconds": m.seconds, "extra_gb": m.extra_gb}
        row.update(extra or {})
        rows.append(row)
        print(f"{n_cells:>9,} {step:<40} {m.seconds:8.2f} s {m.extra_gb:6.2f} GB", flush=True)

    with Measure() as m:
        ref = synthetic_reference(n_cells)
    record("generate reference (not hpvade)", m, {"csr_gb": csr_bytes(ref.X) / 1e9})
    with Measure() as m:
        signature = hpvade.pp.build_signature(ref, LABELS)
    record(SIGNATURE, m)
    with Measure() as m:
        bulk = hpvade.pp.simulate_pseudobulk(ref, LABELS, N_BULK, CELLS_PER_BULK, seed=1)
    record(SIMULATE, m)
    if naive and n_cells <= NAIVE_MAX_CELLS:
        with Measure() as m:
            dense = naive_signature(ref)
        assert np.allclose(dense, signature.to_numpy(), rtol=1e-4)
        record(NAIVE_SIGNATURE, m)
        with Measure() as m:
            naive_pseudobulk(ref, N_BULK)
        record(NAIVE_SIMULATE, m)
    if epochs:
        # Alternate the two models twice and keep each one's faster run: the machines here
        # are shared, and one slow epoch should not decide the ratio.
        hpvade_runs, scvi_runs = [], []
        for _ in range(repeats):
            train_ref = ref.copy()
            with Measure() as m:
                model = hpvade_training(train_ref)
            hpvade_runs.append(m)
            scvi_ref = ref.copy()
            with Measure() as m:
                scvi_training(scvi_ref)
            scvi_runs.append(m)
        record(EPOCH, best(hpvade_runs), {"runs": runs_text(hpvade_runs)})
        record(SCVI_EPOCH, best(scvi_runs), {"runs": runs_text(scvi_runs)})
        pools, calibration = fixed_costs(model)
        record(POOLS, pools)
        record(CALIBRATION, calibration)
        proportion_runs = []
        for _ in range(3):
            fresh = bulk.copy()  # get_proportions writes to obs and obsm; copying is not its work
            with Measure() as m:
                model.get_proportions(fresh)
            del fresh
            proportion_runs.append(m)
        record(PROPORTIONS, best(proportion_runs), {"runs": runs_text(proportion_runs)})
    return rows


def write_backed_bulk(path: Path, signature: np.ndarray, n_samples: int, seed: int = 0) -> None:
    """A samples × genes float32 h5ad of ``n_samples`` synthetic bulks (Dirichlet mixtures of
    the signature's columns, log-normal gene noise), written block by block with h5py so that
    no cohort-sized array is ever held."""
    import h5py

    rng = np.random.default_rng(seed)
    n_genes, n_types = signature.shape
    skeleton = ad.AnnData(
        obs=pd.DataFrame(index=[f"bulk_{i}" for i in range(n_samples)]),
        var=pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)]),
    )
    skeleton.write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        x = f.create_dataset(
            "X", (n_samples, n_genes), dtype="float32", chunks=(min(1000, n_samples), n_genes)
        )
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
        for start in range(0, n_samples, WRITE_BLOCK):
            n = min(WRITE_BLOCK, n_samples - start)
            mixture = rng.dirichlet(np.ones(n_types), n) @ signature.T
            x[start : start + n] = mixture * rng.lognormal(0.0, 0.3, mixture.shape)


def run_backed(sizes: list[int], tmp: Path) -> list[dict]:
    """``get_proportions`` on cohorts opened with ``read_h5ad(path, backed="r")``: time and
    peak extra memory at each size, with a model trained for one epoch on 10,000 cells."""
    ref = synthetic_reference(10_000)
    hpvade.HPVADE.setup_anndata(ref, labels_key=LABELS)
    model = hpvade.HPVADE(ref)
    model.train(max_epochs=1, enable_progress_bar=False, early_stopping=False)
    signature = model.reference_signature_
    rows = []
    for n in sizes:
        path = tmp / f"backed_{n}.h5ad"
        write_backed_bulk(path, signature, n)
        bulk = ad.read_h5ad(path, backed="r")
        with Measure() as m:
            model.get_proportions(bulk)
        assert bulk.obsm["hpvade_proportions"].shape == (n, N_TYPES)
        bulk.file.close()
        path.unlink()
        step = f"get_proportions on {n:,} backed bulks"
        rows.append({"cells": 10_000, "step": step, "seconds": m.seconds, "extra_gb": m.extra_gb})
        print(f"{10_000:>9,} {step:<40} {m.seconds:8.2f} s {m.extra_gb:6.2f} GB", flush=True)
    return rows


def fit_on_device_rows(n_samples: int = N_BULK) -> list[dict]:
    """The robust fit alone on ``benchmarks/fit_speed.py``'s synthetic data (``n_samples`` ×
    1,000 genes × 20 types): the compiled CPU kernels against the same fit in torch on the
    GPU (``hpvade.core._robust_torch``), with its solves on the GPU and on the CPU kernels
    (``DEVICE_SOLVE_ON``), each the best of two runs after one to compile or warm up, with the
    largest difference of their proportions from the CPU kernels'."""
    from fit_speed import data

    from hpvade.core import _estimator
    from hpvade.core._estimator import robust_dampened_fit

    bulk, signature, start = data(n_samples)
    served = _estimator.DEVICE_SOLVE_ON
    rows, found = [], {}
    variants = (
        (None, "device", "CPU kernels"),
        ("cuda", "device", "torch on the GPU"),
        ("cuda", "host", "GPU, solves on the CPU kernels"),
    )
    for device, solve_on, label in variants:
        _estimator.DEVICE_SOLVE_ON = solve_on
        robust_dampened_fit(bulk[:100], signature, start[:100], device=device)
        runs = []
        for _ in range(2):
            with Measure() as m:
                coef, _ = robust_dampened_fit(bulk, signature, start, device=device)
            runs.append(m)
        found[label] = coef / coef.sum(axis=1, keepdims=True)
        step = f"robust fit alone, {n_samples:,} x 1,000 genes, {label}"
        fastest = best(runs)
        rows.append(
            {"cells": 0, "step": step, "seconds": fastest.seconds, "runs": runs_text(runs)}
        )
        print(f"{step:<60} {fastest.seconds:8.2f} s", flush=True)
    _estimator.DEVICE_SOLVE_ON = served
    for row, label in zip(rows[1:], [v[2] for v in variants[1:]], strict=True):
        difference = np.abs(found["CPU kernels"] - found[label]).max()
        print(f"largest difference of the proportions, {label}: {difference:.1e}", flush=True)
        row["runs"] += f" (largest difference from the CPU kernels' proportions {difference:.1e})"
    return rows


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table without the optional ``tabulate`` dependency."""
    cells = [
        [
            f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
            for v in row
        ]
        for row in table.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * table.shape[1]]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def ratio(table: pd.DataFrame, cells: int, slow: str, fast: str) -> float:
    sel = table[table.cells == cells].set_index("step").seconds
    return float(sel[slow] / sel[fast])


def accelerator() -> str:
    """The GPU that training uses (Lightning's accelerator="auto"), or "no GPU"."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)} (training and get_proportions' fit run on it)"
    return "no GPU"


def report(rows: list[dict], sizes: list[int], args, seconds: float) -> str:
    """The results file's text from the rows measured so far."""
    table = pd.DataFrame(rows)
    once_text = (
        f" (once each above {args.train_once_above:,} cells)" if args.train_once_above else ""
    )

    lines = [
        "# Scale benchmark",
        "",
        f"Produced by `benchmarks/scale.py` at {PRODUCED_BY}. Python "
        f"{platform.python_version()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), scvi-tools {scvi.__version__}, "
        f"hpvade {hpvade.__version__}. Machine: {os.cpu_count()} CPU cores, {accelerator()}. "
        f"Run time {seconds:.0f} s.",
        "",
        "Synthetic references (`synthetic_reference` in `benchmarks/scale.py`): 5,000 genes, 20 "
        "types, negative-binomial library sizes, ~5 % non-zero, normalize_total + log1p, CSR "
        "float32. 'extra GB' is the peak resident memory above the level before the step. "
        f"The training rows are a whole `train(max_epochs={EPOCHS})` call (setup, pseudobulk "
        "pools, the passes over the cells, validation; for hpvade also both calibrations) for "
        "both models, batch size 128, run twice alternating hpvade and SCVI"
        f"{once_text}; hpvade's fixed "
        "costs are then re-run alone on the trained model; `get_proportions` is run three "
        "times, each on a fresh copy of the bulk made outside the timing. 'seconds' is the "
        "fastest run, all runs are listed. The backed rows: "
        "synthetic bulk cohorts (samples × 5,000 genes, float32 h5ad) opened with "
        "`anndata.read_h5ad(path, backed='r')` and deconvolved once by a model trained one "
        "epoch on 10,000 cells; their results are written to the backed object's `obs` and "
        "`obsm` in memory.",
        "",
        markdown(table.fillna("")),
        "",
        "## Ratios (same run)",
        "",
    ]
    for n in sizes:
        steps = set(table[table.cells == n].step)
        if NAIVE_SIGNATURE in steps:
            lines.append(
                f"- {n:,} cells: naive / hpvade signature "
                f"{ratio(table, n, NAIVE_SIGNATURE, SIGNATURE):.1f}x; naive / hpvade pseudobulk "
                f"{ratio(table, n, NAIVE_SIMULATE, SIMULATE):.1f}x"
            )
        if EPOCH in steps:
            sel = table[table.cells == n].set_index("step").seconds
            fixed = sel[POOLS] + sel[CALIBRATION]
            per_epoch = (sel[EPOCH] - fixed) / EPOCHS
            default_epochs = hpvade.train.max_epochs_heuristic(n)
            share = fixed / (fixed + default_epochs * per_epoch)
            lines.append(
                f"- {n:,} cells: hpvade / SCVI, whole train() of {EPOCHS} epochs "
                f"{ratio(table, n, EPOCH, SCVI_EPOCH):.2f}; per epoch (fixed cost removed) "
                f"{per_epoch / (sel[SCVI_EPOCH] / EPOCHS):.2f}; hpvade's fixed cost "
                f"{fixed:.1f} s (pools {sel[POOLS]:.1f} s, calibrations {sel[CALIBRATION]:.1f} s) "
                f"is {100 * share:.1f} % of a default train() ({default_epochs} epochs)"
            )
    backed = table[table.step.str.contains("backed")]
    if len(backed) >= 2:
        first, last = backed.iloc[0], backed.iloc[-1]
        size = [int(step.split()[2].replace(",", "")) for step in (first.step, last.step)]
        lines.append(
            f"- backed cohorts, {size[0]:,} to {size[1]:,} samples ({size[1] / size[0]:.0f}x): "
            f"time {last.seconds / first.seconds:.1f}x ({1e3 * first.seconds / size[0]:.2f} and "
            f"{1e3 * last.seconds / size[1]:.2f} ms per sample), peak extra memory "
            f"{first.extra_gb:.2f} and {last.extra_gb:.2f} GB"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--epoch-sizes", default="10000,100000", help="sizes to train on")
    parser.add_argument(
        "--backed-sizes", default=BACKED_SIZES, help="backed cohort sizes ('' for none)"
    )
    parser.add_argument("--output", default=str(HERE / "results" / "scale.md"))
    parser.add_argument(
        "--no-naive", action="store_true", help="skip the straightforward versions (CPU work)"
    )
    parser.add_argument(
        "--train-once-above",
        type=int,
        default=0,
        help="train larger references once rather than twice (0: all twice)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    epoch_sizes = {int(s) for s in args.epoch_sizes.split(",") if s}
    warnings.filterwarnings("ignore", category=UserWarning)
    scvi.settings.seed = 0
    started = time.perf_counter()
    rows = []

    def write() -> str:  # after every size too: a run cut short keeps what it measured
        text = report(rows, sizes, args, time.perf_counter() - started)
        Path(args.output).parent.mkdir(exist_ok=True)
        Path(args.output).write_text(text)
        return text

    with Measure() as m:  # numba compiles its kernel once per install (then cached on disk)
        hpvade.pp.simulate_pseudobulk(synthetic_reference(200), LABELS, 10, 10)
    rows.append({"cells": 200, "step": "first call: kernel compilation", "seconds": m.seconds})
    if torch.cuda.is_available():
        rows += fit_on_device_rows()
        write()
    for n in sizes:
        once = args.train_once_above and n > args.train_once_above
        rows += run_size(n, n in epoch_sizes, not args.no_naive, 1 if once else REPEATS)
        write()
    backed_sizes = [int(s) for s in args.backed_sizes.split(",") if s]
    if backed_sizes:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows += run_backed(backed_sizes, Path(tmp))
    print(write())


if __name__ == "__main__":
    main()
