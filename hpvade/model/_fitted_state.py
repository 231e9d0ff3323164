"""Every attribute that ``train``, ``adapt`` or a calibration sets, with what invalidates it.

One table, one owner: :func:`reset_fitted_state` is the only code that clears fitted state,
and ``train`` / ``adapt`` call it first, so no call can serve results from state left behind by
an earlier one. Attributes end in ``_``, so scvi-tools saves them with the model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FittedAttribute:
    """One piece of fitted state: who sets it and which calls make it stale."""

    name: str
    set_by: str
    invalidated_by: tuple[str, ...]
    holds: str


FITTED_STATE = (
    FittedAttribute(
        "scale_check_", "train", ("train",), "the first-batch scale check of the last train"
    ),
    FittedAttribute(
        "pseudobulk_settings_",
        "train",
        ("train",),
        "cells per pseudobulk and Dirichlet concentration of train's pseudobulks (the "
        "calibrations draw theirs alike)",
    ),
    FittedAttribute(
        "reference_state_",
        "train",
        ("train",),
        "S and the deconvolution network as trained on the reference: every adapt starts here",
    ),
    FittedAttribute(
        "signature_ratios_",
        "train (calibration)",
        ("train",),
        "perturbations of S drawn from the VAE posterior (draws × genes × types), shared by "
        "the interval calibration and get_proportions(n_draws=...)",
    ),
    FittedAttribute(
        "cell_states_",
        "get_cell_type_expression (on first use)",
        ("train",),
        "the reference's cell states (latent clusters) and their profiles",
    ),
    FittedAttribute(
        "state_evidence_",
        "get_cell_type_expression",
        ("train",),
        "per cell type, how far its states moved the last call's estimates and on what "
        "evidence (n_states, split_half_r, weight, profile_shift)",
    ),
    FittedAttribute(
        "adaptation_",
        "adapt",
        ("train", "adapt"),
        "summary of the last adapt (None: the model serves the reference-trained estimator)",
    ),
    FittedAttribute(
        "adapted_signature_",
        "adapt",
        ("train", "adapt"),
        "S exactly as adapt computed it (genes × types, float64), served after adapt; the "
        "module holds it through the training parametrisation (None: not adapted)",
    ),
    FittedAttribute(
        "gene_weights_",
        "adapt",
        ("train", "adapt"),
        "per-gene inverse noise variances of the adapted weighted fit (None: not adapted)",
    ),
    FittedAttribute(
        "unexplained_threshold_",
        "train, adapt",
        ("train", "adapt"),
        "threshold of the unexplained-sample flag, for the estimator being served",
    ),
    FittedAttribute(
        "interval_scale_",
        "train, adapt",
        ("train", "adapt"),
        "per-type conformal factors of the 90 % intervals, for the estimator being served",
    ),
)


def reset_fitted_state(model, event: str | None = None) -> None:
    """Set to ``None`` every fitted attribute that ``event`` invalidates (all when ``None``)."""
    for attribute in FITTED_STATE:
        if event is None or event in attribute.invalidated_by:
            setattr(model, attribute.name, None)
