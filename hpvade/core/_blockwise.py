"""One block of a cohort's samples deconvolved on its own, as Dask schedules it: what a block
needs travels with the function (the network, the estimator, the genes), so a worker of a
``distributed`` cluster can run it without the model or its reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from hpvade.core._diagnostics import (
    bulk_reconstruction_error,
    fractions_of_kind,
    sample_scores,
    unexplained_expression,
)
from hpvade.core._estimator import ProportionEstimator
from hpvade.data._bulk import bulk_to_cpm, on_signature_scale

#: The columns a block returns after the proportions, in order.
BLOCK_SCORES = ("unknown_lower_bound", "unknown_fraction", "fit_score", "unexplained_score")


@dataclass(frozen=True)
class BlockDeconvolution:
    """Deconvolve one block of samples (samples × the bulk's genes) as ``get_proportions``
    does an in-memory bulk: returns samples × (types + 4), the proportions and then
    :data:`BLOCK_SCORES`. The unknown-content score is the block's (its genes are chosen
    across the samples deconvolved together)."""

    #: the model's module (its deconvolution network starts the fit)
    network: object
    estimator: ProportionEstimator
    bulk_genes: pd.Index
    model_genes: pd.Index
    rounds: int
    kind: str
    content: np.ndarray | None
    batch_size: int

    def over(self, values):
        """The lazy results of a Dask array of samples × the bulk's genes: one task per block
        of whole samples, samples × (types + :data:`BLOCK_SCORES`)."""
        values = values.rechunk({1: -1})
        width = self.estimator.signature.shape[1] + len(BLOCK_SCORES)
        return values.map_blocks(self, dtype=np.float64, chunks=(values.chunks[0], (width,)))

    def __call__(self, block) -> np.ndarray:
        values = AnnData(
            np.asarray(block, dtype=np.float64), var=pd.DataFrame(index=self.bulk_genes)
        )
        cpm = bulk_to_cpm(values, self.model_genes, None, allow_missing=True)
        found = np.asarray(self.model_genes.isin(self.bulk_genes))
        if not found.all():
            on_signature_scale(cpm, self.estimator.signature, found)
        initial = self.network.predict_proportions(cpm, self.batch_size)
        fit = self.estimator.fit(cpm, initial, self.rounds, found)
        unknown_rna = self.estimator.unknown_share(cpm, fit, found)
        proportions, unknown = fractions_of_kind(
            fit.proportions, self.kind, self.content, unknown_rna
        )
        signature = self.estimator.signature
        scores = [
            sample_scores(score, cpm, fit.proportions, signature)
            for score in (bulk_reconstruction_error, unexplained_expression)
        ]
        return np.column_stack([proportions, np.clip(unknown_rna, 0.0, 1.0), unknown, *scores])
