"""Run by ``test_training_on_two_processes``: train with DDP on 2 CPU processes (gloo).

Lightning's DDP starts the second process by running this script again, so it must be a
script, not a test. Each process writes what it ended with to ``<out>/rank<r>.json``.
"""

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import scvi

import hpvade
from hpvade.data._split import stratified_split
from hpvade.datasets import PBMC_LABELS_KEY


def main(out: Path) -> None:
    scvi.settings.seed = 0
    reference, held_out = hpvade.datasets.split_by_type(
        hpvade.datasets.pbmc68k_reference(), PBMC_LABELS_KEY, fraction=0.5, seed=0
    )
    bulk = hpvade.pp.simulate_pseudobulk(
        held_out, PBMC_LABELS_KEY, n_pseudobulk=120, cells_per_pseudobulk=500, seed=1
    )
    hpvade.HPVADE.setup_anndata(reference, labels_key=PBMC_LABELS_KEY)
    model = hpvade.HPVADE(reference)
    # a batch size that leaves each process one cell in its last batch, which BatchNorm
    # cannot take: train() must drop it in every process
    n_train = stratified_split(model.simulator.codes, 0.9, np.random.default_rng(0))[0].size
    batch_size = math.ceil(n_train / 2) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(
            max_epochs=20,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            n_pseudobulk=800,
            batch_size=batch_size,
            enable_progress_bar=False,
        )
        proportions = model.get_proportions(bulk)
    truth = bulk.obsm["proportions"][proportions.columns].to_numpy()
    rank = model.trainer.global_rank
    result = {
        "world_size": model.trainer.world_size,
        "scale_ratio": model.scale_check_["scale_ratio"],
        "unexplained_threshold": float(model.unexplained_threshold_),
        "r": float(np.corrcoef(proportions.to_numpy().ravel(), truth.ravel())[0, 1]),
        "proportions": proportions.to_numpy().tolist(),
        "deconv_weight_sum": float(model.module.deconv_out.weight.detach().sum()),
        "train_loss": model.history["train_loss"]["train_loss"].tolist() if rank == 0 else [],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
