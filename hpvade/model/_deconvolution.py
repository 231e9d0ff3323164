"""Serving proportions: ``get_proportions`` (the walk of a bulk: validate, prepare, fit,
diagnose, write; backed bulks a chunk at a time, Dask-backed ones a block at a time), the
estimator it serves, and ``write_proportions``."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import settings
from scvi.utils import track

from hpvade._compat import renamed_keywords
from hpvade._constants import (
    ESTIMATOR_KEY,
    FIT_SCORE_KEY,
    GENE_REPORT_KEY,
    PROPORTIONS_KEY,
    UNEXPLAINED_KEY,
    UNEXPLAINED_SCORE_KEY,
    UNKNOWN_COLUMN,
    UNKNOWN_FRACTION_KEY,
    UNKNOWN_LOWER_BOUND_KEY,
    UNKNOWN_MAP_KEY,
)
from hpvade._logging import interactive_output
from hpvade.core import (
    BLOCK_SCORES,
    DEFAULT_ROUNDS,
    DRAW_ROUNDS,
    BlockDeconvolution,
    ProportionEstimator,
    ProportionFit,
    bulk_reconstruction_error,
    fractions_of_kind,
    interval,
    sample_scores,
    unexplained_expression,
    unknown_cell_shares,
    whole_sample_fractions,
)
from hpvade.data._bulk import (
    as_bulk_anndata,
    check_fit_genes,
    measured_unknown_share,
    prepare_bulk,
)
from hpvade.data._labels import indicator_matrix
from hpvade.data._matrix import get_matrix, is_dask_array

logger = logging.getLogger(__name__)

#: Bulk samples per forward pass of the deconvolution network.
DEFAULT_BATCH_SIZE = 1024
#: get_proportions warns when more than this share of the samples is flagged unexplained: the
#: flag also marks a few per cent of samples the reference does explain
#: (``benchmarks/results/unknown.md``), which alone is no reason to alarm.
UNEXPLAINED_WARN_SHARE = 0.1
#: A backed bulk is deconvolved this many values (samples × genes) at a time.
BACKED_CHUNK_VALUES = 20_000_000
#: A gene the robust fit set aside in at least this share of samples is named in the report.
SET_ASIDE_REPORTED = 0.5


def result_keys(key_added: str) -> dict[str, str]:
    """The keys ``get_proportions`` writes besides ``obsm[key_added]``: the default ones
    (``hpvade_fit_score``, ...) with ``key_added``'s prefix (``key_added`` without a
    ``"_proportions"`` suffix) in place of ``"hpvade"``."""
    prefix = key_added.removesuffix("_proportions")
    keys = {
        "unknown_fraction": UNKNOWN_FRACTION_KEY,
        "unknown_lower_bound": UNKNOWN_LOWER_BOUND_KEY,
        "unknown_map": UNKNOWN_MAP_KEY,
        "fit_score": FIT_SCORE_KEY,
        "unexplained_score": UNEXPLAINED_SCORE_KEY,
        "unexplained": UNEXPLAINED_KEY,
        "gene_report": GENE_REPORT_KEY,
        "estimator": ESTIMATOR_KEY,
    }
    return {name: prefix + key.removeprefix("hpvade") for name, key in keys.items()}


@dataclass(frozen=True)
class _Request:
    """What a ``get_proportions`` call asked for, carried along its walk."""

    layer: str | None
    key_added: str
    batch_size: int
    rounds: int  # 0: the network's output as is
    kind: str
    n_draws: int
    use_states: bool
    unknown_content: float


class DeconvolutionMixin:
    """``get_proportions``, the estimator it serves, and what it writes on the bulk."""

    @renamed_keywords("0.3", "0.4", state_aware="use_states")
    def get_proportions(
        self,
        bulk: AnnData,
        layer: str | None = None,
        key_added: str = PROPORTIONS_KEY,
        batch_size: int | None = None,
        method: Literal["fit", "network"] = "fit",
        n_rounds: int = DEFAULT_ROUNDS,
        kind: Literal["cell", "rna"] = "cell",
        n_draws: int = 0,
        use_states: bool = False,
        unknown_share: np.ndarray | pd.Series | str | None = None,
        unknown_content: float = 1.0,
    ) -> pd.DataFrame:
        """Estimate the cell-type proportions of bulk samples (docs: "Proportions of a new bulk").

        Parameters
        ----------
        bulk
            Samples × genes on a linear scale (counts, CPM, TPM): an AnnData (in memory,
            backed, or Dask-backed) or a DataFrame. Genes are matched by name.
        layer
            Layer with the values; ``None``: ``bulk.X``.
        key_added
            ``obsm`` key of the proportions; the other keys written share its prefix.
        batch_size
            Samples per forward pass of the network (1024).
        method
            ``"fit"``: the robust fit of each sample to S (:meth:`estimator`), started from
            the network's output; ``"network"``: the network's output as is.
        n_rounds
            Re-weighting rounds of the robust fit.
        kind
            ``"cell"``: fractions of cells; ``"rna"``: of the sample's RNA.
        n_draws
            Signature draws for 90 % intervals (0: none; 20 is a good default).
        use_states
            Fit with every cell state (:meth:`cell_states`) as a column of S.
        unknown_share, unknown_content
            The share of each sample's cells the reference lacks, where you know it (array,
            Series or ``obs`` column; NaN: not measured), and their relative RNA content:
            the result is then fractions of the whole sample, with an ``"unknown"`` column.

        Returns
        -------
        DataFrame (samples × cell types), rows summing to 1; also in ``bulk.obsm[key_added]``.
        The scores, flag and report written beside it: docs, "What get_proportions writes".
        """
        if kind not in ("cell", "rna"):
            raise ValueError(f'`kind` must be "cell" or "rna", got {kind!r}.')
        if method not in ("fit", "network"):
            raise ValueError(f'`method` must be "fit" or "network", got {method!r}.')
        self._check_if_trained(warn=False, message=self._not_trained_message)
        rounds = n_rounds if method == "fit" else 0
        request = _Request(layer, key_added, batch_size or DEFAULT_BATCH_SIZE, rounds, kind,
                           n_draws, use_states, unknown_content)  # fmt: skip
        bulk = as_bulk_anndata(bulk)
        if is_dask_array(get_matrix(bulk, layer)):
            if n_draws or use_states or unknown_share is not None:
                raise ValueError(
                    "A Dask-backed bulk is deconvolved block by block with the default fit: "
                    "`n_draws`, `use_states` and `unknown_share` need it in memory "
                    "(`bulk = bulk.to_memory()`, or deconvolve a subset)."
                )
            return self._proportions_by_dask(bulk, request)
        if bulk.isbacked:
            if unknown_share is not None:
                raise ValueError(
                    "`unknown_share` needs the bulk in memory (the map from the score to the "
                    "share is fitted on the whole cohort): load it with `bulk.to_memory()`."
                )
            return self._proportions_by_chunk(bulk, request)
        return self._deconvolve(bulk, request, unknown_share)

    def _deconvolve(self, bulk: AnnData, request: _Request, unknown_share=None) -> pd.DataFrame:
        """The walk of an in-memory bulk: validate, prepare, fit, diagnose, write."""
        keys = result_keys(request.key_added)
        # validate and prepare
        measured = None
        if unknown_share is not None:
            measured = measured_unknown_share(bulk, unknown_share, self.cell_types, UNKNOWN_COLUMN)
        estimator = self.estimator()
        prepared = prepare_bulk(
            bulk,
            request.layer,
            self.var_names,
            estimator.signature,
            estimator.fit_genes,
            self.selected_genes_,
            stacklevel=settings.warnings_stacklevel + 3,  # the user's line
        )
        cpm, found = prepared.cpm, prepared.found
        # fit: the network's output starts the robust fit
        initial = self.module.predict_proportions(cpm, request.batch_size)
        fit = estimator.fit(cpm, initial, request.rounds, found)
        if request.use_states:
            fit = self._state_aware_fit(cpm, fit, found)
        mixture = fit.proportions
        # diagnostics
        unknown_rna = estimator.unknown_share(cpm, fit, found)
        kind = request.kind
        proportions, unknown = fractions_of_kind(mixture, kind, self.rna_content_, unknown_rna)
        report = prepared.report
        if fit.set_aside is not None:  # fitted genes set aside in at least half the samples
            names = self.var_names[estimator.fit_genes & found]
            report["set_aside_genes"] = [
                str(g) for g in names[fit.set_aside >= SET_ASIDE_REPORTED]
            ]
        fit_score = sample_scores(bulk_reconstruction_error, cpm, mixture, estimator.signature)
        unexplained = sample_scores(unexplained_expression, cpm, mixture, estimator.signature)
        # write
        bulk.uns[keys["gene_report"]] = report
        result = pd.DataFrame(proportions, index=bulk.obs_names.copy(), columns=self.cell_types)
        bulk.obs[keys["unknown_lower_bound"]] = np.clip(unknown_rna, 0.0, 1.0)
        bulk.obs[keys["unknown_fraction"]] = unknown
        if measured is not None:
            result = self._whole_sample(bulk, result, unknown_rna, measured, request, keys)
        bulk.obsm[request.key_added] = result
        bulk.uns[keys["estimator"]] = self._estimator_report(estimator, request)
        bulk.obs[keys["fit_score"]] = fit_score
        self._write_flag(bulk, unexplained, keys)
        if request.n_draws > 0:
            self._write_intervals(bulk, cpm, mixture, found, request)
            if measured is not None:  # the known types' intervals, as fractions of the whole
                known = result.loc[:, self.cell_types].sum(axis=1).to_numpy()
                for end in ("std", "lower", "upper"):
                    key = f"{request.key_added}_{end}"
                    bulk.obsm[key] = bulk.obsm[key].mul(known, axis=0)
        logger.info("Deconvolved %d samples (%s fractions).", bulk.n_obs, kind)
        return result

    def estimator(self) -> ProportionEstimator:
        """The proportion estimator being served (what :meth:`get_proportions` fits with).

        Returns
        -------
        :class:`~hpvade.core.ProportionEstimator`: S (as :meth:`get_signature`), the genes
        of the robust fit (``selected_genes_``) and, after :meth:`adapt`, the gene weights of
        its exact weighted fit; on the model's device.
        """
        if self.selected_genes_ is None:  # a model saved before gene selection: every gene
            fit_genes = np.ones(len(self.var_names), dtype=bool)
        else:
            fit_genes = np.asarray(self.var_names.isin(self.selected_genes_))
        weights = None if self.gene_weights_ is None else np.asarray(self.gene_weights_, float)
        if self.adapted_signature_ is not None:  # adapt's S exactly
            signature = np.asarray(self.adapted_signature_, dtype=np.float64)
        else:
            signature = self.module.signature_array()
        return ProportionEstimator(signature, fit_genes, weights, device=str(self.device))

    @torch.inference_mode()
    def get_signature(self) -> pd.DataFrame:
        """The signature S being served.

        Returns
        -------
        DataFrame (genes × cell types), CPM: columns sum to 1e6 (after :meth:`adapt`, as its
        regression left them, within a few per mille).
        """
        signature = self.estimator().signature
        return pd.DataFrame(signature, index=self.var_names, columns=self.cell_types)

    # ------------------------------------------------------------------------------ helpers
    def _estimator_report(self, estimator, request: _Request) -> dict:
        return {
            "estimator": estimator.name if request.rounds > 0 else "network",
            "adapted": self.gene_weights_ is not None,
            "n_rounds": int(request.rounds),
            "use_states": bool(request.use_states),
        }

    def _state_aware_fit(self, cpm: np.ndarray, fit: ProportionFit, found) -> ProportionFit:
        """The robust fit with every cell state as a column, started from ``fit`` spread over
        each type's states; each type's coefficient is the sum of its states'."""
        states = self.cell_states()
        start = fit.proportions[:, states.cell_type] * states.frequencies
        served = self.estimator()
        expanded = ProportionEstimator(
            states.profiles, served.fit_genes, device=served.device
        ).fit(cpm, start, DEFAULT_ROUNDS, found)
        by_type = indicator_matrix(states.cell_type, len(self.cell_types))  # types × states
        proportions = (by_type @ expanded.proportions.T).T
        return ProportionFit(proportions, expanded.explained, expanded.set_aside)

    def _whole_sample(self, bulk, known, score, measured, request, keys) -> pd.DataFrame:
        """Fractions of the whole sample, with the ``"unknown"`` column (see
        :func:`hpvade.core.unknown_cell_shares` for the unmeasured samples)."""
        # the warning's line: past this helper, _deconvolve, get_proportions, its wrapper
        share, fitted = unknown_cell_shares(score, measured, settings.warnings_stacklevel + 4)
        if fitted is not None:
            bulk.uns[keys["unknown_map"]] = fitted.as_dict()
        values = whole_sample_fractions(
            known.to_numpy(), share, request.kind, self.rna_content_, request.unknown_content
        )
        return pd.DataFrame(values, index=known.index, columns=[*self.cell_types, UNKNOWN_COLUMN])

    def _write_flag(self, bulk: AnnData, score: np.ndarray, keys: dict, stacklevel=4) -> None:
        """The unexplained score, and the flag where the threshold is calibrated (a warning
        when more than ``UNEXPLAINED_WARN_SHARE`` of the samples are flagged)."""
        bulk.obs[keys["unexplained_score"]] = score
        if self.unexplained_threshold_ is None:
            logger.info("The unexplained-sample flag is not calibrated: no flag written.")
            return
        flagged = score > self.unexplained_threshold_
        bulk.obs[keys["unexplained"]] = flagged
        self._warn_if_unexplained(flagged, keys, stacklevel + 1)

    def _warn_if_unexplained(self, flagged: np.ndarray, keys: dict, stacklevel: int) -> None:
        if flagged.mean() > UNEXPLAINED_WARN_SHARE:
            warnings.warn(
                f"{int(flagged.sum())} of {flagged.size} bulk samples ({flagged.mean():.0%}) are "
                "not explained by the reference (unexplained expression above "
                f'{self.unexplained_threshold_:.3g}; see bulk.obs["{keys["unexplained"]}"]): more '
                "than the few per cent of samples the reference explains that the flag marks "
                "too. Likely causes: "
                "a cell type missing from the reference, a strong batch or platform effect "
                "between the reference and the bulk (try `model.adapt(bulk)`), or values on the "
                "wrong scale.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel + stacklevel - 1,
            )

    def _write_intervals(self, bulk, cpm, mixture, found, request: _Request) -> None:
        if self.interval_scale_ is None:
            logger.info("Calibrating the intervals (first call with draws).")
            self.calibrate_uncertainty()
        n_draws, kind = request.n_draws, request.kind
        if self.signature_ratios_ is not None and n_draws <= len(self.signature_ratios_):
            ratios = self.signature_ratios_[:n_draws].astype(float)  # drawn at calibration
        else:
            ratios = self.signature_draws(n_draws, seed=settings.seed or 0)
        n_rounds = min(max(request.rounds, 1), DRAW_ROUNDS)
        draws = self.estimator().draws(cpm, mixture, ratios, n_rounds, found)
        none = np.zeros(len(mixture))
        draws = np.stack([fractions_of_kind(d, kind, self.rna_content_, none)[0] for d in draws])
        estimate = fractions_of_kind(mixture, kind, self.rna_content_, none)[0]
        lower, upper = interval(estimate, draws, self.interval_scale_)
        index, columns, key = bulk.obs_names.copy(), self.cell_types, request.key_added
        bulk.obsm[f"{key}_std"] = pd.DataFrame(draws.std(axis=0), index, columns)
        bulk.obsm[f"{key}_lower"] = pd.DataFrame(lower, index, columns)
        bulk.obsm[f"{key}_upper"] = pd.DataFrame(upper, index, columns)

    def write_proportions(
        self,
        bulk: AnnData,
        store,
        layer: str | None = None,
        kind: Literal["cell", "rna"] = "cell",
        n_rounds: int = DEFAULT_ROUNDS,
    ) -> None:
        """Deconvolve a Dask-backed bulk block by block into a zarr store, for cohorts whose
        results do not fit in memory; nothing is written on ``bulk``.

        Parameters
        ----------
        bulk
            Bulk samples whose values are a Dask array; ``layer``, ``kind``, ``n_rounds``: as
            in :meth:`get_proportions`.
        store
            A path or zarr store. Its array ``results`` holds samples (``bulk.obs_names``'
            order) × the proportions, then the scores :meth:`get_proportions` writes in
            ``obs``, all named in its ``columns`` attribute.
        """
        import zarr

        if not is_dask_array(get_matrix(bulk, layer)):
            raise TypeError("`bulk`'s values must be a Dask array; this one is in memory.")
        results = self._dask_results(bulk, layer, kind, n_rounds, DEFAULT_BATCH_SIZE, 2)[1]
        results.to_zarr(store, component="results", overwrite=True)
        columns = [*self.cell_types, *BLOCK_SCORES]
        zarr.open_array(store, path="results", mode="r+").attrs["columns"] = columns

    def _dask_results(self, bulk, layer, kind, rounds, batch_size, stacklevel: int):
        """The block deconvolution of a Dask-backed bulk and its lazy results (``stacklevel``:
        of the user's line, from the caller)."""
        estimator = self.estimator()
        found = np.asarray(self.var_names.isin(bulk.var_names))
        if not found.all():
            check_fit_genes(bulk, self.var_names, estimator.fit_genes, found,
                            len(self.cell_types), stacklevel=stacklevel + 2)  # fmt: skip
        block = BlockDeconvolution(
            self.module, estimator, bulk.var_names, self.var_names, rounds, kind,
            self.rna_content_, batch_size,
        )  # fmt: skip
        return block, block.over(get_matrix(bulk, layer))

    def _proportions_by_dask(self, bulk, request: _Request) -> pd.DataFrame:
        """A bulk whose values are a Dask array: each block of samples is deconvolved by
        :class:`~hpvade.core.BlockDeconvolution` as Dask schedules it (its threaded scheduler,
        or the user's ``distributed`` client); only the results come back."""
        block, lazy = self._dask_results(
            bulk, request.layer, request.kind, request.rounds, request.batch_size, 4
        )
        n_types = len(self.cell_types)
        results = np.asarray(lazy.compute())
        keys = result_keys(request.key_added)
        result = pd.DataFrame(results[:, :n_types], bulk.obs_names.copy(), self.cell_types)
        bulk.obsm[request.key_added] = result
        for j, name in enumerate(BLOCK_SCORES):
            bulk.obs[keys[name]] = results[:, n_types + j]
        if self.unexplained_threshold_ is not None:
            flagged = bulk.obs[keys["unexplained_score"]].to_numpy() > self.unexplained_threshold_
            bulk.obs[keys["unexplained"]] = flagged
            self._warn_if_unexplained(flagged, keys, stacklevel=4)
        bulk.uns[keys["estimator"]] = self._estimator_report(block.estimator, request)
        logger.info("Deconvolved %d samples in %d blocks.", bulk.n_obs, lazy.numblocks[0])
        return result

    def _proportions_by_chunk(self, bulk: AnnData, request: _Request) -> pd.DataFrame:
        """A backed bulk (``anndata.read_h5ad(path, backed="r")``): the in-memory walk over
        chunks of ``BACKED_CHUNK_VALUES`` values, keeping only each chunk's results, so memory
        stays bounded whatever the cohort's size. The cohort statistics (the unknown
        fraction's genes, the gene report) are each chunk's (the report: the first's)."""
        keys, added = result_keys(request.key_added), request.key_added
        per_chunk = max(1, BACKED_CHUNK_VALUES // max(bulk.n_vars, 1))
        obs, obsm, uns, flagged = [], {}, {}, []
        starts = range(0, bulk.n_obs, per_chunk)
        bar = not interactive_output() or len(starts) < 2  # disabled: one chunk, or a log file
        for start in track(starts, description="Deconvolving chunks", disable=bar):
            part = bulk[start : start + per_chunk].to_memory()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._deconvolve(part, request)
            for warning in caught:  # the others once; the unexplained warning for all below
                if "not explained by the reference" not in str(warning.message):
                    stacklevel = settings.warnings_stacklevel + 2  # the user's line
                    warnings.warn(warning.message, warning.category, stacklevel=stacklevel)
            obs.append(part.obs[[k for k in keys.values() if k in part.obs]])
            for key in [added] + [f"{added}_{end}" for end in ("std", "lower", "upper")]:
                if key in part.obsm:
                    obsm.setdefault(key, []).append(part.obsm[key])
            uns = uns or {k: part.uns[k] for k in (keys["gene_report"], keys["estimator"])}
            if keys["unexplained"] in part.obs:
                flagged.append(part.obs[keys["unexplained"]].to_numpy())
            logger.info("Samples %d-%d of %d deconvolved.", start, start + part.n_obs, bulk.n_obs)
        for column, values in pd.concat(obs).items():
            bulk.obs[column] = values.to_numpy()
        for key, frames in obsm.items():
            bulk.obsm[key] = pd.concat(frames).set_axis(bulk.obs_names)
        bulk.uns.update(uns)
        if flagged:
            self._warn_if_unexplained(np.concatenate(flagged), keys, stacklevel=4)
        return bulk.obsm[added].copy()
