"""hpvade: Hierarchical Prototype VAE for bulk RNA-seq deconvolution on AnnData."""

import logging

from hpvade import _compat, baselines, datasets, metrics, pl, pp, tl  # noqa: F401
from hpvade._exceptions import NonFiniteLossError, ScaleMismatchError
from hpvade.model import HPVADE

__version__ = "0.2.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "HPVADE",
    "NonFiniteLossError",
    "ScaleMismatchError",
    "__version__",
    "baselines",
    "datasets",
    "metrics",
    "pl",
    "pp",
    "tl",
]
