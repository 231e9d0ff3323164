"""The proportion estimator a model serves, as one object: the signature, the genes the fit
uses and, after ``adapt``, the gene weights. A model returns it from
:meth:`hpvade.HPVADE.estimator`; :func:`hpvade.tl.fit_proportions` builds one without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpvade.core._solvers import (
    DEFAULT_ROUNDS,
    ProportionFit,
    proportion_fit,
)
from hpvade.core._unknown import unknown_share
from hpvade.data._signature import scale_columns_to_cpm


@dataclass(frozen=True)
class ProportionEstimator:
    """A bulk's proportions from a signature: the robust fit, or the adapted weighted fit.

    Attributes
    ----------
    signature
        Genes × types, CPM (columns sum to 1e6).
    fit_genes
        Boolean mask over the signature's genes: those the robust fit uses (the model's
        selected markers).
    gene_weights
        Per-gene weights of an adapted model's weighted fit (``None``: the robust fit).
    device
        Where the robust fit runs: ``None`` or ``"cpu"``, the compiled CPU kernels; an
        accelerator (``"cuda"``), the same fit in torch there (a model's own device).
    """

    signature: np.ndarray
    fit_genes: np.ndarray
    gene_weights: np.ndarray | None = None
    device: str | None = None

    @property
    def name(self) -> str:
        """``"weighted_nnls"`` (adapted) or ``"robust_dampened_wls"``."""
        return "weighted_nnls" if self.gene_weights is not None else "robust_dampened_wls"

    def gene_index(self, found: np.ndarray | None = None) -> np.ndarray:
        """Rows of the genes the robust fit uses (of those the bulk has, given ``found``)."""
        return np.flatnonzero(self.fit_genes if found is None else self.fit_genes & found)

    def fit(
        self,
        cpm: np.ndarray,
        initial: np.ndarray,
        n_rounds: int = DEFAULT_ROUNDS,
        found: np.ndarray | None = None,
        signature: np.ndarray | None = None,
    ) -> ProportionFit:
        """Fit every sample of ``cpm`` (samples × the signature's genes, CPM), started from
        ``initial``; ``found``: the genes the bulk has (the others are left out);
        ``signature``: another S on the same genes (a signature draw). ``n_rounds <= 0``
        returns ``initial`` as is."""
        signature = self.signature if signature is None else signature
        if self.gene_weights is None:
            genes = {"genes": self.gene_index(found), "device": self.device}
        else:
            weights = np.asarray(self.gene_weights, dtype=float)
            genes = {"gene_weights": weights if found is None else weights * found}
        return proportion_fit(cpm, signature, initial, n_rounds, **genes)

    def draws(
        self,
        cpm: np.ndarray,
        estimate: np.ndarray,
        ratios: np.ndarray,
        n_rounds: int,
        found: np.ndarray | None = None,
    ) -> np.ndarray:
        """Proportions re-fitted under each perturbed signature ``S * ratio`` (``ratios``:
        draws × genes × types), started from ``estimate``: draws × samples × types."""
        return np.stack(
            [
                self.fit(
                    cpm, estimate, n_rounds, found, scale_columns_to_cpm(self.signature * ratio)
                ).proportions
                for ratio in ratios
            ]
        )

    def unknown_share(
        self, cpm: np.ndarray, fit: ProportionFit, found: np.ndarray | None = None
    ) -> np.ndarray:
        """The share of each sample's expression the signature's types cannot explain (see
        :func:`hpvade.core._unknown.unknown_share`), on the genes the bulk has."""
        signature = self.signature
        if found is not None and not found.all():
            cpm, signature = cpm[:, found], signature[found]
        return unknown_share(cpm, fit.proportions * fit.explained[:, None], signature)
