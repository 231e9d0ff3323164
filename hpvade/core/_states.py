"""Cell states inside a bulk sample: state profiles and their per-sample weights.

Each cell type's reference cells are split into states by k-means in the VAE's latent space.
A state's profile is its cells' aggregate, shrunk towards what the decoder makes of them
(the geometric mean of the two, each calibrated to the type's column of S), so that small
states are smoothed by the generative model. For every bulk sample the weights of each type's
states are fitted to the bulk on the log scale with the type's share held at the served
proportion; each gene's bulk expression is then split among the types
(:mod:`hpvade.core._allocation`).

How far each type's fitted state weights are followed is decided per type by the cohort
(:mod:`hpvade.core._state_evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.vq import kmeans, vq

from hpvade.data._labels import indicator_matrix
from hpvade.data._signature import scale_columns_to_cpm

#: States per cell type (k-means clusters in the latent space).
STATES_PER_TYPE = 2
#: k-means restarts; the split with the lowest distortion is kept (one start can split a type
#: along a minor axis).
KMEANS_RESTARTS = 10
#: Fewest reference cells a state must have; smaller types keep one state.
MIN_CELLS_PER_STATE = 10
#: CPM added before taking logs in the state fit.
LOG_PSEUDOCOUNT = 0.1
#: Adam steps of the state fit, and its learning rate.
STATE_FIT_STEPS = 300
STATE_FIT_LR = 0.1
#: Samples fitted together (bounds the working memory: samples × genes × a few floats).
STATE_FIT_CHUNK = 1024


@dataclass(frozen=True)
class CellStates:
    """States of the reference's cell types.

    Attributes
    ----------
    profiles
        State profiles (genes × states, CPM; each column sums to 1e6).
    cell_type
        Index of the cell type of each state.
    frequencies
        Each state's share of its type's reference RNA.
    """

    profiles: np.ndarray
    cell_type: np.ndarray
    frequencies: np.ndarray


def cluster_states(
    latent: np.ndarray, codes: np.ndarray, n_types: int, seed: int = 0
) -> np.ndarray:
    """A state index per cell: k-means (``STATES_PER_TYPE``) on each type's latent codes;
    states are numbered type by type."""
    states = np.zeros(codes.size, dtype=np.int64)
    offset = 0
    for t in range(n_types):
        cells = np.flatnonzero(codes == t)
        n_states = min(STATES_PER_TYPE, max(1, cells.size // MIN_CELLS_PER_STATE))
        if n_states > 1:
            points = latent[cells].astype(np.float64)
            centres, _ = kmeans(points, n_states, iter=KMEANS_RESTARTS, seed=seed)
            labels = vq(points, centres)[0]
            # a centre can be left without cells: renumber the ones used
            labels = np.unique(labels, return_inverse=True)[1]
            n_states = labels.max() + 1
        else:
            labels = np.zeros(cells.size, dtype=np.int64)
        states[cells] = offset + labels
        offset += n_states
    return states


def state_profiles(
    aggregated: np.ndarray,
    decoded: np.ndarray,
    state_type: np.ndarray,
    signature: np.ndarray,
) -> CellStates:
    """Combine the states' aggregated and decoded expression into :class:`CellStates`.

    Parameters
    ----------
    aggregated
        Summed linear expression of each state's cells (states × genes).
    decoded
        Summed decoded expression (RNA-weighted ``px_scale``) of each state's cells
        (states × genes).
    state_type
        Cell type of each state.
    signature
        The reference signature S (genes × types, CPM).
    """
    by_type = indicator_matrix(state_type, signature.shape[1])  # types × states
    # each state relative to its type, from both sources, applied to the type's column of S
    relative = []
    for source in (aggregated, decoded):
        source = np.asarray(source, dtype=np.float64)
        per_type = by_type @ source
        shares = source / np.maximum(source.sum(axis=1, keepdims=True), 1e-300)
        type_shares = per_type / np.maximum(per_type.sum(axis=1, keepdims=True), 1e-300)
        relative.append(shares / np.maximum(type_shares[state_type], 1e-300))
    fold = np.sqrt(relative[0] * relative[1])
    profiles = scale_columns_to_cpm(signature[:, state_type] * fold.T)
    rna = aggregated.sum(axis=1)
    frequencies = rna / np.maximum((by_type @ rna)[state_type], 1e-300)
    return CellStates(profiles, state_type.astype(np.int64), frequencies)


def fit_state_weights(
    bulk_cpm: np.ndarray,
    proportions: np.ndarray,
    states: CellStates,
    n_steps: int = STATE_FIT_STEPS,
) -> np.ndarray:
    """Each sample's weights of its types' states (samples × states; they sum to 1 within a
    type), fitted to ``log(bulk + c)`` with each type's share held at ``proportions``.

    The log scale lets every expressed gene count, not only the most abundant ones: the
    genes that tell a type's states apart are often modest in the bulk. Types with one state
    get weight 1. Samples are fitted in chunks, all of a chunk at once (Adam on the logits).
    """
    parts = []
    for start in range(0, bulk_cpm.shape[0], STATE_FIT_CHUNK):
        rows = slice(start, start + STATE_FIT_CHUNK)
        parts.append(_fit_chunk(bulk_cpm[rows], proportions[rows], states, n_steps))
    if not parts:
        return np.zeros((0, states.cell_type.size))
    return np.concatenate(parts)


def _fit_chunk(bulk_cpm, proportions, states: CellStates, n_steps: int) -> np.ndarray:
    dtype = torch.float32
    owner = torch.as_tensor(states.cell_type)
    n_states = owner.numel()
    n_types = proportions.shape[1]
    indicator = torch.zeros(n_states, n_types, dtype=dtype)
    indicator[torch.arange(n_states), owner] = 1.0
    profiles = torch.as_tensor(states.profiles.T, dtype=dtype)  # states × genes
    shares = torch.as_tensor(proportions, dtype=dtype)[:, owner]
    target = torch.log(torch.as_tensor(bulk_cpm, dtype=dtype) + LOG_PSEUDOCOUNT)
    start = torch.log(torch.as_tensor(states.frequencies, dtype=dtype).clamp_min(1e-6))
    logits = start.expand(bulk_cpm.shape[0], -1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=STATE_FIT_LR)

    def weights() -> torch.Tensor:
        exp = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        return exp / (exp @ indicator)[:, owner]

    with torch.enable_grad():
        for _ in range(n_steps):
            fitted = (shares * weights()) @ profiles
            loss = (torch.log(fitted + LOG_PSEUDOCOUNT) - target).square().mean(dim=1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return weights().double().numpy()


def sample_profiles(weights: np.ndarray, states: CellStates, cell_type: int) -> np.ndarray:
    """One type's state-aware profile in each sample (samples × genes, CPM)."""
    members = np.flatnonzero(states.cell_type == cell_type)
    return weights[:, members] @ states.profiles[:, members].T
