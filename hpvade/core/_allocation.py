"""Splitting each gene's bulk expression among the cell types: the types' profiles in each
sample, their adaptation to a cohort's donors, and the split itself.

Gene g of sample i goes to type k in proportion to ``p_ik q_ikg`` (the expectation BayesPrism
uses, with per-sample profiles ``q`` in place of the reference's). A profile is one of

- a gene vector all samples share (a column of S: allocation);
- a :class:`StateMix`, the type's state-aware profile in each sample as a mix of a few fixed
  profiles, ``weights @ basis``, which is how the cell states give it;
- a samples × genes array.

The first two are never expanded to samples × genes before the split: the cohort factors'
least squares and the split's sums are products of the mixes' weights and bases, exact and
an order of magnitude cheaper than the dense arrays (which remain accepted).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hpvade._constants import CPM_SCALE

#: Weight, in samples, of the prior that keeps each type's profile at the reference's in
#: :func:`cohort_type_factors`: a cohort much larger than this sets its own factors, a few
#: samples keep them nearer 1.
COHORT_PRIOR_SAMPLES = 10.0
#: Entries (samples × genes × types, or genes × profiles²) of one chunk of
#: :func:`cohort_type_factors`.
COHORT_CHUNK_ENTRIES = 2**24
#: Smallest factor (the least-squares factors are not bounded below).
MIN_COHORT_FACTOR = 1e-3


class StateMix(NamedTuple):
    """A type's profile in each sample, ``weights @ basis`` (samples × genes)."""

    #: samples × r
    weights: np.ndarray
    #: r × genes
    basis: np.ndarray


def _as_mix(profile, n_samples: int) -> StateMix | None:
    """``profile`` as a :class:`StateMix` (a shared vector: one basis row, weight 1), or
    None for a dense samples × genes array."""
    if isinstance(profile, StateMix):
        return profile
    if np.ndim(profile) == 1:
        return StateMix(np.ones((n_samples, 1)), np.asarray(profile, dtype=float)[None])
    return None


def dense_profile(profile, n_samples: int) -> np.ndarray:
    """``profile`` as samples × genes (a shared vector broadcast, read-only)."""
    if isinstance(profile, StateMix):
        return profile.weights @ profile.basis
    return np.broadcast_to(profile, (n_samples, np.shape(profile)[-1]))


def scale_profiles(profiles: list, factors: np.ndarray) -> list:
    """Each type's profile times its column of ``factors`` (genes × types)."""
    out = []
    for k, profile in enumerate(profiles):
        if isinstance(profile, StateMix):
            out.append(StateMix(profile.weights, profile.basis * factors[:, k]))
        else:
            out.append(profile * factors[:, k])
    return out


def _stacked(proportions: np.ndarray, profiles: list):
    """Every profile as mixes, stacked: ``(W, B, owner)`` with ``W`` samples × r (each mix's
    weights times its type's share), ``B`` r × genes and ``owner`` each row's type; None if
    some profile is a dense array."""
    mixes = [_as_mix(profile, proportions.shape[0]) for profile in profiles]
    if any(mix is None for mix in mixes):
        return None
    weights = np.hstack([proportions[:, [k]] * mix.weights for k, mix in enumerate(mixes)])
    basis = np.vstack([mix.basis for mix in mixes])
    owner = np.concatenate([np.full(mix.basis.shape[0], k) for k, mix in enumerate(mixes)])
    return weights, basis, owner


def mixed_profiles(proportions: np.ndarray, profiles: list) -> np.ndarray:
    """``sum_k proportions[:, k] * profiles[k]`` (samples × genes): the bulk the types'
    profiles predict."""
    stacked = _stacked(proportions, profiles)
    if stacked is not None:
        return stacked[0] @ stacked[1]
    total = np.zeros((proportions.shape[0], np.shape(profiles[0])[-1]))
    for k, profile in enumerate(profiles):
        total += proportions[:, k, None] * dense_profile(profile, proportions.shape[0])
    return total


def cohort_type_factors(
    bulk_cpm: np.ndarray,
    proportions: np.ndarray,
    profiles: list,
    prior_samples: float = COHORT_PRIOR_SAMPLES,
) -> np.ndarray:
    """Per gene and type, how the samples' cells of the type differ from their profiles
    (genes × types): ``f`` minimising ``sum_i (bulk_ig - sum_k f_gk p_ik q_ikg)^2`` over the
    samples, plus a ridge towards 1 of ``prior_samples`` samples' weight.

    The samples' donors differ from the reference's gene by gene and type by type; a cohort
    shows how, because the types' shares vary between its samples (the per-gene regression of
    CIBERSORTx's high-resolution mode and bMIND, here around the reference's profiles).
    """
    n_samples, n_genes = bulk_cpm.shape
    n_types = proportions.shape[1]
    stacked = _stacked(proportions, profiles)
    if stacked is None:
        gram, linear = _dense_normal_equations(bulk_cpm, proportions, profiles)
    else:
        gram, linear = _mix_normal_equations(bulk_cpm, *stacked, n_types)
    trace = np.trace(gram, axis1=1, axis2=2)
    ridge = prior_samples * trace / (n_types * max(n_samples, 1))
    ridge = np.where(trace > 0, ridge, 1.0)  # a gene no profile has: factor 1
    system = gram + ridge[:, None, None] * np.eye(n_types)
    factors = np.linalg.solve(system, (linear + ridge[:, None])[..., None])[..., 0]
    return np.maximum(factors, MIN_COHORT_FACTOR)


def _mix_normal_equations(bulk_cpm, weights, basis, owner, n_types):
    """The per-gene Gram matrices and right-hand sides of :func:`cohort_type_factors` from
    the stacked mixes: ``sum_i p_ik q_ikg p_il q_ilg = sum_{s in k, t in l} B_sg M_st B_tg``
    with ``M = W'W``, never forming samples × genes × types."""
    n_genes = basis.shape[1]
    by_type = np.zeros((n_types, basis.shape[0]))
    by_type[owner, np.arange(owner.size)] = 1.0
    moments = weights.T @ weights
    linear = (by_type @ (basis * (weights.T @ bulk_cpm))).T
    gram = np.empty((n_genes, n_types, n_types))
    step = max(1, COHORT_CHUNK_ENTRIES // max(1, basis.shape[0] ** 2))
    for start in range(0, n_genes, step):
        columns = basis[:, start : start + step].T  # genes × r
        products = columns[:, :, None] * moments * columns[:, None, :]
        gram[start : start + step] = by_type @ products @ by_type.T
    return gram, linear


def _dense_normal_equations(bulk_cpm, proportions, profiles):
    n_samples, n_genes = bulk_cpm.shape
    n_types = proportions.shape[1]
    gram = np.zeros((n_genes, n_types, n_types))
    linear = np.zeros((n_genes, n_types))
    step = min(n_samples, max(1, COHORT_CHUNK_ENTRIES // max(1, n_genes * n_types)))
    buffer = np.empty((step, n_genes, n_types))  # one chunk's samples × genes × types, reused
    for start in range(0, n_samples, step):
        rows = slice(start, start + step)
        design = buffer[: len(range(n_samples)[rows])]
        for k, profile in enumerate(profiles):
            shared = dense_profile(profile, n_samples)[rows]
            np.multiply(proportions[rows, k, None], shared, out=design[:, :, k])
        # optimize=True: a batched matrix product, not einsum's default loop
        gram += np.einsum("igk,igl->gkl", design, design, optimize=True)
        linear += np.einsum("igk,ig->gk", design, bulk_cpm[rows], optimize=True)
    return gram, linear


def allocate(
    bulk_cpm: np.ndarray,
    proportions: np.ndarray,
    profiles: list,
    cell_types: list[int],
) -> dict[int, np.ndarray]:
    """Each of ``cell_types``' share of each gene's bulk expression, scaled to CPM
    (``{type index: samples × genes}``): gene g of sample i goes to type k in proportion to
    ``proportions[i, k] * profiles[k][i, g]``."""
    weight = np.ones(proportions.shape[1])
    return split_bulk(bulk_cpm, proportions, profiles, None, weight, cell_types)


def split_bulk(
    bulk_cpm: np.ndarray,
    proportions: np.ndarray,
    profiles: list,
    signature: np.ndarray | None,
    weight: np.ndarray,
    cell_types: list[int],
) -> dict[int, np.ndarray]:
    """Each of ``cell_types``' share of each gene's bulk (``{type: samples × genes}``, CPM):
    the split by ``profiles`` (:func:`allocate`) and the split by the reference profiles
    (allocation, the columns of ``signature``), averaged with each type's ``weight``:
    ``weight × split by profiles + (1 − weight) × allocation``.

    Without the average a type whose profiles barely moved would still move with the
    others': where other types' profiles claim more of a gene, it would get less of it.
    A type with weight 0 gets allocation exactly; with weight 1, the split by ``profiles``.
    """
    n_samples = proportions.shape[0]
    moved = [k for k in cell_types if weight[k] > 0]
    kept = [k for k in cell_types if weight[k] < 1]
    out = {}
    if moved:
        per_unit = mixed_profiles(proportions, profiles)  # the bulk per unit of prediction
        np.divide(bulk_cpm, per_unit, out=per_unit, where=per_unit > 0)
        for k in moved:
            share = proportions[:, k, None] * dense_profile(profiles[k], n_samples)
            share *= per_unit
            sums = share.sum(axis=1, keepdims=True)
            share *= np.divide(
                weight[k] * CPM_SCALE, sums, out=np.zeros_like(sums), where=sums > 0
            )
            out[k] = share
    if kept:
        per_unit = proportions @ signature.T
        np.divide(bulk_cpm, per_unit, out=per_unit, where=per_unit > 0)
        # p_ik cancels from a type's split: its CPM is S_kg x per_unit_ig, rescaled per sample
        sums = per_unit @ signature[:, kept]
        scale = np.divide(CPM_SCALE, sums, out=np.zeros_like(sums), where=sums > 0)
        scale *= (1.0 - weight[kept]) * (proportions[:, kept] > 0)
        for j, k in enumerate(kept):
            share = per_unit * signature[:, k]
            share *= scale[:, j, None]
            if k in out:
                out[k] += share
            else:
                out[k] = share
    return {k: out[k] for k in cell_types}
