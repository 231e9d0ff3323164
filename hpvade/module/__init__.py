"""Torch modules (scvi-tools ``BaseModuleClass``)."""

from hpvade.module._hpvade import LOSS_TERMS, HPVADEModule

__all__ = ["LOSS_TERMS", "HPVADEModule"]
