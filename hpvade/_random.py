"""One rule for seeds: ``seed=None`` is ``scvi.settings.seed`` (0 where it is unset)."""

from __future__ import annotations

import numpy as np
from scvi import settings


def default_rng(seed: int | None) -> np.random.Generator:
    """A numpy generator seeded by ``seed``, or by ``scvi.settings.seed`` where it is None."""
    return np.random.default_rng((settings.seed or 0) if seed is None else seed)
