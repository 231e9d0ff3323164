"""Each sample's cell-type-specific expression: ``get_scale_for_ct`` and
``get_cell_type_expression``."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import settings

from hpvade._logging import progress
from hpvade.core import (
    CellStates,
    StateEvidence,
    cluster_states,
    cohort_type_factors,
    evidence_weighted_profiles,
    scale_profiles,
    split_bulk,
    state_profiles,
)
from hpvade.data._bulk import as_bulk_anndata, prepare_bulk
from hpvade.data._labels import indicator_matrix
from hpvade.data._pseudobulk import mix_cells
from hpvade.data._simulator import PseudobulkSimulator

logger = logging.getLogger(__name__)

#: Reference cells per type that define its states (a random subset of larger types).
MAX_CELLS_PER_TYPE_FOR_STATES = 2000
#: A type whose states get less than this weight is named in the warning given when no
#: type's states move the estimates (the estimate itself has no threshold).
LOW_STATE_WEIGHT = 0.1


class ExpressionMixin:
    """Cell-type-specific expression of bulk samples from the VAE's cell states."""

    def get_scale_for_ct(
        self,
        bulk: AnnData | pd.DataFrame,
        cell_type: str,
        layer: str | None = None,
        use_states: bool | None = None,
    ) -> pd.DataFrame:
        """Each sample's expression profile of one cell type's cells.

        The name follows :meth:`scvi.model.DestVI.get_scale_for_ct`. See
        :meth:`get_cell_type_expression` for how it is estimated.

        Parameters
        ----------
        bulk
            Bulk samples (samples × genes) on a linear scale, as for :meth:`get_proportions`.
        cell_type
            One of :attr:`cell_types`.
        layer
            Layer of ``bulk`` with the values; ``None`` uses ``bulk.X``.
        use_states
            As for :meth:`get_cell_type_expression`.

        Returns
        -------
        DataFrame (samples × the model's genes that the bulk has), CPM: rows sum to 1e6.
        """
        if cell_type not in self.cell_types:
            raise ValueError(
                f"Unknown cell type {cell_type!r}; the model's types are {list(self.cell_types)}."
            )
        return self.get_cell_type_expression(
            bulk, layer, cell_types=[cell_type], use_states=use_states
        )[cell_type]

    def get_cell_type_expression(
        self,
        bulk: AnnData | pd.DataFrame,
        layer: str | None = None,
        cell_types: list[str] | None = None,
        use_states: bool | None = None,
    ) -> dict[str, pd.DataFrame]:
        """Each sample's expression profile of each cell type's cells (docs: "Each sample's
        cell-type expression").

        Each gene's bulk is split among the types by ``proportion × profile``; a type's
        profile follows its cell states (VAE latent clusters) as far as the cohort's evidence
        goes (split-half agreement of the fitted state weights across samples), else its
        reference profile. Pass a cohort together: a single sample gets allocation. What was
        used is in :attr:`state_evidence_`; nothing is written to ``bulk``.

        Parameters
        ----------
        bulk
            Bulk samples on a linear scale, as for :meth:`get_proportions`.
        layer
            Layer with the values; ``None``: ``bulk.X``.
        cell_types
            Types to return; ``None``: all.
        use_states
            ``None``: each type's states weighted by the evidence; ``True``: followed fully
            whatever the evidence; ``False``: none (allocation by the reference profiles).

        Returns
        -------
        ``{cell type: DataFrame}``: samples × the model's genes the bulk has, CPM (rows sum to
        1e6; zeros where a type's share is 0).
        """
        wanted = list(self.cell_types) if cell_types is None else list(cell_types)
        bulk = as_bulk_anndata(bulk)
        self._check_if_trained(warn=False, message=self._not_trained_message)
        served = self.estimator()
        prepared = prepare_bulk(
            bulk,
            layer,
            self.var_names,
            served.signature,
            served.fit_genes,
            self.selected_genes_,
            stacklevel=settings.warnings_stacklevel + 1,  # the user's line
        )
        cpm, found = prepared.cpm, prepared.found
        initial = self.module.predict_proportions(cpm)
        mixture = served.fit(cpm, initial, found=found).proportions
        genes = np.flatnonzero(found)
        cpm = cpm[:, genes]
        signature = self.reference_signature_[genes]
        profiles = list(signature.T)  # allocation by the reference profiles
        evidence = None
        if use_states is None and not self.module.use_vae:
            warnings.warn(
                "This model was built with `use_vae=False` and has no cell states: each gene's "
                "bulk is split among the types by their reference profiles (allocation). Build "
                "it with the default `use_vae=True` and train it for state-aware profiles.",
                UserWarning,
                stacklevel=2,
            )
        elif use_states is not False:
            state_aware, evidence = self._evidence_weighted_profiles(
                cpm, mixture, genes, force=bool(use_states)
            )
            factors = cohort_type_factors(cpm, mixture, state_aware)
            profiles = scale_profiles(state_aware, factors)
            if use_states is None:
                self._warn_if_no_state_moved(evidence, bulk.n_obs)
        self.state_evidence_ = self._evidence_frame(evidence)
        index, columns = bulk.obs_names.copy(), self.var_names[genes]
        indices = [self.cell_types.get_loc(n) for n in wanted]
        # the weight of each type's split by its profiles against allocation's (forced: 1)
        weight = np.full(len(self.cell_types), float(bool(use_states)))
        if evidence is not None and use_states is None:
            weight = evidence.weight
        shares = split_bulk(cpm, mixture, profiles, signature, weight, indices)
        result = {
            name: pd.DataFrame(shares[self.cell_types.get_loc(name)], index, columns)
            for name in wanted
        }
        for name, frame in result.items():
            frame.attrs["hpvade_state_evidence"] = self.state_evidence_.loc[name].to_dict()
        logger.info("Cell-type expression of %d samples, %d types.", bulk.n_obs, len(wanted))
        return result

    def _evidence_weighted_profiles(
        self, cpm, mixture, genes, force: bool = False
    ) -> tuple[list[np.ndarray], StateEvidence]:
        """Each type's profile per sample (samples × ``genes``), its states followed as far
        as the samples support (:func:`hpvade.core.evidence_weighted_profiles`)."""
        states = self.cell_states()
        states = CellStates(states.profiles[genes], states.cell_type, states.frequencies)
        signature = self.reference_signature_[genes]
        profiles, evidence = evidence_weighted_profiles(cpm, mixture, states, signature, force)
        logger.info(
            "Cell states' weights per type: %s.",
            ", ".join(
                f"{t} {w:.2f}" for t, w in zip(self.cell_types, evidence.weight, strict=True)
            ),
        )
        return profiles, evidence

    def _evidence_frame(self, evidence: StateEvidence | None) -> pd.DataFrame:
        """:class:`~hpvade.core.StateEvidence` as a DataFrame (types × fields); all
        weights 0 where the states were not used."""
        n_types = len(self.cell_types)
        if evidence is None:
            evidence = StateEvidence(
                np.zeros(n_types, dtype=np.int64),
                np.full(n_types, np.nan),
                np.zeros(n_types),
                np.zeros(n_types),
            )
        return pd.DataFrame(
            {
                "n_states": evidence.n_states,
                "split_half_r": evidence.split_half_r,
                "weight": evidence.weight,
                "profile_shift": evidence.profile_shift,
            },
            index=pd.Index(self.cell_types, name="cell_type"),
        )

    def _warn_if_no_state_moved(self, evidence: StateEvidence, n_samples: int) -> None:
        with_states = evidence.n_states > 1
        if not with_states.any() or (evidence.weight[with_states] >= LOW_STATE_WEIGHT).any():
            return
        names = ", ".join(str(t) for t in self.cell_types[with_states])
        warnings.warn(
            f"No cell type's states moved its expression in these {n_samples} bulk samples "
            f"({names}: state weights below {LOW_STATE_WEIGHT}; see `model.state_evidence_`): "
            "their fitted state mixes did not agree between two halves of the genes, so each "
            "type's profile stays at the reference's (allocation, adapted to the cohort). "
            "Pass the samples of a cohort together (the evidence comes from the differences "
            "between them), use a reference that holds the states expected in the samples, "
            "or pass `use_states=True` to follow the fitted states regardless.",
            UserWarning,
            stacklevel=3,
        )

    def cell_states(self) -> CellStates:
        """The reference's cell states (computed once, then kept in ``cell_states_``).

        Returns
        -------
        A ``CellStates`` record: ``profiles`` (genes × states, CPM),
        ``cell_type`` (each state's type index, in the order of :attr:`cell_types`) and
        ``frequencies`` (each state's share of its type's reference RNA).
        """
        if self.cell_states_ is None:
            self._check_if_trained(warn=False, message=self._not_trained_message)
            simulator = self.simulator  # the reference's cells
            if not self.module.use_vae:
                raise ValueError(
                    "Cell states are clusters in the VAE's latent space, and this model was "
                    "built with `use_vae=False` (its VAE is untrained). Build it with the "
                    "default `use_vae=True` and train it to get cell-type expression or "
                    "state-aware proportions."
                )
            self.cell_states_ = self._compute_cell_states(simulator)
        return self.cell_states_

    @torch.no_grad()
    def _compute_cell_states(self, simulator: PseudobulkSimulator) -> CellStates:
        rng = np.random.default_rng(settings.seed or 0)
        codes = simulator.codes
        n_types = len(self.cell_types)
        members = simulator.cells_by_type(MAX_CELLS_PER_TYPE_FOR_STATES, rng)
        subset = np.concatenate(members)
        sub_codes = codes[subset]
        self.module.eval()
        loader = self._make_data_loader(adata=self.adata, indices=subset, batch_size=1024)
        latent, library = [], []
        for tensors in loader:
            inference = self.module.inference(**self.module._get_inference_input(tensors))
            latent.append(inference["qz"].loc)
            library.append(inference["library"])
        latent, library = torch.cat(latent), torch.cat(library)
        state_of_cell = cluster_states(
            latent.cpu().numpy(), sub_codes, n_types, seed=int(rng.integers(2**31))
        )
        n_states = int(state_of_cell.max()) + 1
        state_type = np.zeros(n_states, dtype=np.int64)
        state_type[state_of_cell] = sub_codes
        indicator = indicator_matrix(state_of_cell, n_states, subset, codes.size)
        aggregated = mix_cells(self.adata, indicator, simulator.layer, simulator.log1p)
        totals = simulator.cell_totals()[subset]
        decoded_sum = self._decoded_by_state(latent, library, state_of_cell, totals, n_states)
        genes = self.module.vae_gene_index
        if genes is not None:
            # genes the VAE does not model: the aggregate alone, on the decoded sums' scale
            genes = genes.cpu().numpy()
            full = np.asarray(aggregated, dtype=np.float64).copy()
            scale = decoded_sum.sum(axis=1) / np.maximum(full[:, genes].sum(axis=1), 1e-300)
            full *= scale[:, None]
            full[:, genes] = decoded_sum
            decoded_sum = full
        logger.info("Cell states: %d over %d types.", n_states, n_types)
        return state_profiles(aggregated, decoded_sum, state_type, self.reference_signature_)

    def _decoded_by_state(self, latent, library, state_of_cell, totals, n_states) -> np.ndarray:
        """Each state's sum of its cells' decoded profiles, weighted by each cell's RNA (as the
        aggregate is); decoded a batch at a time, so no cells × genes array is held."""
        weights = torch.as_tensor(totals, device=latent.device)
        index = torch.as_tensor(state_of_cell, device=latent.device)
        total = torch.zeros(
            n_states, self.module.n_vae_genes, dtype=torch.float64, device=latent.device
        )
        for start in progress(range(0, totals.size, 1024), "Cell states"):
            rows = slice(start, start + 1024)
            scale = self.module.generative(latent[rows], library[rows])["px_scale"].double()
            total.index_add_(0, index[rows], scale * weights[rows, None])
        return total.cpu().numpy()
