"""Torch modules (scvi-tools ``BaseModuleClass``) and the losses they train on."""

from hpvade._constants import LOSS_TERMS
from hpvade.module._hpvade import HPVADEModule
from hpvade.module._losses import (
    anscombe,
    bulk_reconstruction_error,
    sample_scores,
    unexplained_expression,
)

__all__ = [
    "LOSS_TERMS",
    "HPVADEModule",
    "anscombe",
    "bulk_reconstruction_error",
    "sample_scores",
    "unexplained_expression",
]
