"""Models (scvi-tools ``BaseModelClass``)."""

from hpvade.model._hpvade import HPVADE

__all__ = ["HPVADE"]
