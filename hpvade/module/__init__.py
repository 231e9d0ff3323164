"""Torch modules (scvi-tools ``BaseModuleClass``)."""

import warnings

from hpvade._constants import LOSS_TERMS
from hpvade.module._hpvade import HPVADEModule

__all__ = ["LOSS_TERMS", "HPVADEModule"]

#: Names that moved to the estimation core (``hpvade.core``); importable from here until 0.4.
_MOVED = ("anscombe", "bulk_reconstruction_error", "sample_scores", "unexplained_expression")


def __getattr__(name: str):
    if name in _MOVED:
        import hpvade.core

        warnings.warn(
            f"`hpvade.module.{name}` moved to `hpvade.core.{name}`; the old place stops "
            "working in 0.4.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(hpvade.core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
