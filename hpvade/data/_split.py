"""Stratified train/validation split of reference cells."""

from __future__ import annotations

import numpy as np


def stratified_split(
    codes: np.ndarray, train_size: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split cell indices per type; every type keeps at least one training cell.

    Returns sorted ``(train_idx, val_idx)``. Loops over types, not cells.
    """
    if not 0 < train_size <= 1:
        raise ValueError(f"`train_size` must be in (0, 1], got {train_size}.")
    val_parts = []
    for t in np.unique(codes):
        cells = rng.permutation(np.flatnonzero(codes == t))
        n_val = min(int(round((1 - train_size) * cells.size)), cells.size - 1)
        val_parts.append(cells[:n_val])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.array([], dtype=np.int64)
    train_mask = np.ones(codes.size, dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx.astype(np.int64)
