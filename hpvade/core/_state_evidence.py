"""How far each cell type's states are followed: evidence from the cohort, per type.

The state weights of every sample are fitted to the bulk
(:func:`hpvade.core._states.fit_state_weights`)
on all the informative genes, and twice more, on two disjoint halves of them. The agreement of
the two half fits across the samples (their split-half correlation, stepped up to all genes by
the Spearman-Brown formula, ``2r / (1 + r)``) is the reliability of the fitted weights, and the
share of their change from the reference's state mix that is served: an empirical-Bayes
shrinkage whose strength the cohort sets. States that track something real in the samples
are fitted alike from either half; weights that only absorb noise, or changes the reference's
states do not hold, are not. There is no threshold: the served profile moves smoothly from the
reference profile (allocation) to the fully state-aware one as the evidence grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpvade.core._allocation import StateMix
from hpvade.core._states import CellStates, fit_state_weights

#: Most genes the state weights are fitted on: those whose profiles differ most between the
#: states of a type (the rest cannot tell the states apart, and only cost time).
MAX_STATE_FIT_GENES = 2000
#: CPM added to the state profiles before ranking genes by their log differences, so that
#: genes barely expressed in any state do not rank first.
STATE_GENE_PSEUDOCOUNT = 10.0
#: Fewest samples with a type present for its split-half correlation to be computed; below
#: it the type's states are not used (weight 0).
MIN_SAMPLES_FOR_EVIDENCE = 3


@dataclass(frozen=True)
class StateEvidence:
    """Per cell type, how far its states moved the served profiles, and why.

    Attributes
    ----------
    n_states
        The type's states (1: nothing to fit, weight 0).
    split_half_r
        Correlation across the samples of the type's state weights fitted on two disjoint
        halves of the genes (weighted by the type's share; NaN where it cannot be computed).
    weight
        Share of the fitted change from the reference's state mix that is served: the
        Spearman-Brown step-up ``2r / (1 + r)`` of ``split_half_r`` (0 where r ≤ 0); 1 for
        every type with states when they are forced (``use_states=True``).
    profile_shift
        Mean over the samples where the type is present of the share of its profile's CPM
        that the states moved away from the reference profile (0: allocation; 1: disjoint).
    """

    n_states: np.ndarray
    split_half_r: np.ndarray
    weight: np.ndarray
    profile_shift: np.ndarray


def state_fit_genes(states: CellStates, bulk_cpm: np.ndarray) -> np.ndarray:
    """Indices of the genes the state weights are fitted on: those expressed in the bulk
    whose log profiles vary most between the states of a type (summed over types), at most
    ``MAX_STATE_FIT_GENES``."""
    logged = np.log(states.profiles + STATE_GENE_PSEUDOCOUNT)
    spread = np.zeros(logged.shape[0])
    for k in np.unique(states.cell_type):
        members = np.flatnonzero(states.cell_type == k)
        if members.size > 1:
            spread += logged[:, members].var(axis=1)
    spread[bulk_cpm.sum(axis=0) <= 0] = 0.0
    candidates = np.flatnonzero(spread > 0)
    if candidates.size > MAX_STATE_FIT_GENES:
        candidates = np.sort(candidates[np.argsort(-spread[candidates])[:MAX_STATE_FIT_GENES]])
    return candidates


def _weighted_correlation(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> float:
    """Pearson correlation of the rows of ``a`` and ``b`` (samples × states, flattened over
    states after centring each state), each sample weighted by ``weights``."""
    weights = weights / weights.sum()
    a = a - weights @ a
    b = b - weights @ b
    cross = weights @ (a * b).sum(axis=1)
    scale = np.sqrt((weights @ np.square(a).sum(axis=1)) * (weights @ np.square(b).sum(axis=1)))
    return float(cross / scale) if scale > 1e-12 else np.nan


def evidence_weighted_profiles(
    bulk_cpm: np.ndarray,
    proportions: np.ndarray,
    states: CellStates,
    signature: np.ndarray,
    force: bool = False,
    seed: int = 0,
) -> tuple[list[np.ndarray | StateMix], StateEvidence]:
    """Each type's profile in each sample, its states followed as far as
    the cohort supports, and the evidence per type.

    A type's profile in sample i is its reference profile (the column of ``signature``)
    times the fold by which its state mix in the sample changes its states' profile,
    ``(w̃_i P) / (f P)``: ``P`` the states' profiles, ``f`` their reference frequencies, and
    ``w̃_i = f + weight × (w_i - f)`` the weights fitted to the bulk (:func:`fit_state_weights`)
    shrunk towards ``f`` by the type's :class:`StateEvidence` weight (an empirical-Bayes
    shrinkage whose strength is the reliability of the fitted weights, estimated from the
    cohort). With weight 0 the profile is the reference profile (allocation).

    Each profile is the type's column of S where its weight is 0, else a
    :class:`~hpvade.core._allocation.StateMix` (``weights @ basis``: samples × genes).

    Parameters
    ----------
    bulk_cpm
        Bulk samples (samples × genes, CPM) on the genes of ``states`` and ``signature``.
    proportions
        Each sample's mixture fractions (samples × types).
    states
        The reference's cell states on the same genes.
    signature
        The reference signature S (genes × types, CPM).
    force
        Follow every type's fitted weights fully (weight 1), whatever the evidence.
    seed
        Seed of the random split of the genes into halves.
    """
    n_types = proportions.shape[1]
    genes = state_fit_genes(states, bulk_cpm)
    fit_states = CellStates(states.profiles[genes], states.cell_type, states.frequencies)
    fitted = fit_state_weights(bulk_cpm[:, genes], proportions, fit_states)
    halves = []
    if not force and genes.size >= 2:
        first = np.random.default_rng(seed).permutation(genes.size) < genes.size // 2
        for half in (first, ~first):
            part = CellStates(fit_states.profiles[half], states.cell_type, states.frequencies)
            halves.append(fit_state_weights(bulk_cpm[:, genes[half]], proportions, part))
    n_states = np.bincount(states.cell_type, minlength=n_types)
    split_half_r = np.full(n_types, np.nan)
    weight = np.zeros(n_types)
    shift = np.zeros(n_types)
    profiles = []
    for k in range(n_types):
        members = np.flatnonzero(states.cell_type == k)
        present = proportions[:, k] > 0
        if members.size > 1 and force:
            weight[k] = 1.0
        elif members.size > 1 and halves and present.sum() >= MIN_SAMPLES_FOR_EVIDENCE:
            r = _weighted_correlation(
                halves[0][present][:, members],
                halves[1][present][:, members],
                proportions[present, k],
            )
            split_half_r[k] = r
            weight[k] = 2 * r / (1 + r) if r > 0 else 0.0
        reference = signature[:, k]
        if weight[k] == 0.0:
            profiles.append(reference)
            continue
        frequencies = states.frequencies[members] / states.frequencies[members].sum()
        mixed = states.profiles[:, members] @ frequencies
        shrunk = frequencies + weight[k] * (fitted[:, members] - frequencies)
        # the profile (w̃_i P) / (f P) ⊙ S_k as a mix of the states' rows of that fold
        # (rows sum to 1 within a type, so genes no state expresses keep S_k)
        fold = np.divide(reference, mixed, out=np.zeros_like(mixed), where=mixed > 0)
        basis = states.profiles[:, members].T * fold
        basis[:, mixed <= 0] = reference[mixed <= 0]
        profiles.append(StateMix(shrunk, basis))
        if present.any():
            shift[k] = _profile_shift(shrunk[present] @ basis, reference)
    return profiles, StateEvidence(n_states, split_half_r, weight, shift)


def _profile_shift(profiles: np.ndarray, reference: np.ndarray) -> float:
    """Mean over the rows of ``profiles`` of the share of their total that differs from the
    ``reference`` profile, both as shares of their sums (half the L1 distance)."""
    sums = profiles.sum(axis=1, keepdims=True)
    profiles /= np.where(sums > 0, sums, 1.0)
    profiles -= reference / max(reference.sum(), 1e-300)
    np.abs(profiles, out=profiles)
    return float(0.5 * profiles.sum(axis=1).mean())
