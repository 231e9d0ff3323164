"""Stratified train/validation split of reference cells."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def random_cells_per_type(
    codes: np.ndarray, count: Callable[[int], int], rng: np.random.Generator
) -> np.ndarray:
    """Mask of ``count(n)`` random cells of each type (n: the type's cells).

    Types are visited in sorted code order, one permutation each, so a seed gives the same
    cells whichever split uses it. Loops over types, not cells.
    """
    chosen = np.zeros(codes.size, dtype=bool)
    for t in np.unique(codes):
        cells = rng.permutation(np.flatnonzero(codes == t))
        chosen[cells[: count(cells.size)]] = True
    return chosen


def stratified_split(
    codes: np.ndarray, train_size: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split cell indices per type; every type keeps at least one training cell.

    Returns sorted ``(train_idx, val_idx)``.
    """
    if not 0 < train_size <= 1:
        raise ValueError(f"`train_size` must be in (0, 1], got {train_size}.")
    validation = random_cells_per_type(
        codes, lambda n: min(int(round((1 - train_size) * n)), n - 1), rng
    )
    return np.flatnonzero(~validation), np.flatnonzero(validation).astype(np.int64)
