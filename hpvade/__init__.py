"""hpvade: Hierarchical Prototype VAE for bulk RNA-seq deconvolution on AnnData."""

import importlib
import logging
import sys

from hpvade import _compat, baselines, datasets, metrics, pl, pp, tl  # noqa: F401
from hpvade._exceptions import NonFiniteLossError, ScaleMismatchError
from hpvade.model import HPVADE

__version__ = "0.2.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Modules of 0.2.0 whose classes a saved model may pickle (``cell_states_``): their new homes,
# so that a model saved by 0.2.0 still loads.
_MOVED_MODULES = {
    "hpvade._states": "hpvade.core._states",
    "hpvade._estimator": "hpvade.core._estimator",
    "hpvade._signature_fit": "hpvade.core._signature_fit",
    "hpvade._solvers": "hpvade.core._estimator",
    "hpvade._intervals": "hpvade.core._calibration",
}
for _old, _new in _MOVED_MODULES.items():
    sys.modules.setdefault(_old, importlib.import_module(_new))

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
