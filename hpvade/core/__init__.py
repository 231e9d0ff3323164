"""The estimation core: proportions, a cohort's adaptation and cell-type expression computed
from bulk samples and the signature S, as numpy / numba / torch functions that need no model.

``model/`` serves these; each can be called and tested on its own. One concept a module:

- ``_estimator``: ``ProportionEstimator``, the served fit as one object, the robust dampened
  fit and ``proportion_fit``, the one rule for which fit runs;
- ``_robust_kernel`` / ``_robust_torch``: the robust fit's rounds compiled for the CPU (numba),
  with the exact non-negative least squares over a shared Gram matrix (the robust fit's start;
  an adapted model's gene-weighted fit), and the rounds in torch for an accelerator;
- ``_signature_fit``: ``adapt``'s numerics (gene noise weights, S re-estimated on a cohort);
- ``_blockwise``: one block of a cohort deconvolved on its own (Dask's blocks);
- ``_diagnostics``: what a fit says of each sample beyond its proportions: scores on the
  Anscombe scale (also the training's bulk loss), the share the reference's types cannot
  explain, and fractions of cells, of RNA or of the whole sample;
- ``_calibration``: the calibrator beside the estimator: the flag's threshold and the
  intervals' split-conformal scale from fits of known composition, and the interval maths;
- ``_states`` / ``_state_evidence``: cell states, each sample's state weights, how far the
  cohort's evidence lets each type follow them;
- ``_allocation``: each gene's bulk split among the types (per-sample profiles, cohort
  factors).
"""

from hpvade.core._allocation import (
    StateMix,
    allocate,
    cohort_type_factors,
    scale_profiles,
    split_bulk,
)
from hpvade.core._blockwise import BLOCK_SCORES, BlockDeconvolution
from hpvade.core._calibration import conformal_scale, flag_threshold, interval, interval_scale
from hpvade.core._diagnostics import (
    UnknownShareMap,
    anscombe,
    bulk_reconstruction_error,
    fit_unknown_share_map,
    fractions_of_kind,
    rna_to_cell_fractions,
    sample_scores,
    unexplained_expression,
    unknown_cell_shares,
    whole_sample_fractions,
)
from hpvade.core._estimator import (
    DEFAULT_ROUNDS,
    DRAW_ROUNDS,
    ProportionEstimator,
    ProportionFit,
    proportion_fit,
)
from hpvade.core._robust_kernel import rows_sum_to_one, weighted_nnls
from hpvade.core._signature_fit import ADAPT_OPTIONS, adapt_to_cohort
from hpvade.core._state_evidence import StateEvidence, evidence_weighted_profiles
from hpvade.core._states import CellStates, cluster_states, state_profiles

__all__ = [
    "BLOCK_SCORES",
    "BlockDeconvolution",
    "ADAPT_OPTIONS",
    "DEFAULT_ROUNDS",
    "DRAW_ROUNDS",
    "CellStates",
    "ProportionEstimator",
    "ProportionFit",
    "StateEvidence",
    "adapt_to_cohort",
    "allocate",
    "anscombe",
    "bulk_reconstruction_error",
    "cluster_states",
    "cohort_type_factors",
    "conformal_scale",
    "flag_threshold",
    "interval_scale",
    "evidence_weighted_profiles",
    "split_bulk",
    "scale_profiles",
    "StateMix",
    "proportion_fit",
    "interval",
    "rows_sum_to_one",
    "sample_scores",
    "state_profiles",
    "unexplained_expression",
    "weighted_nnls",
    "UnknownShareMap",
    "fit_unknown_share_map",
    "fractions_of_kind",
    "rna_to_cell_fractions",
    "unknown_cell_shares",
    "whole_sample_fractions",
]
