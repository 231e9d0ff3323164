"""Serving proportions: ``get_proportions`` and the per-sample scores written with them."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import settings
from scvi.utils import track

from hpvade._compat import renamed_keywords
from hpvade._constants import PROPORTIONS_KEY, UNKNOWN_COLUMN, result_keys
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
from hpvade.data._bulk import as_bulk_anndata, measured_unknown_share
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


class DeconvolutionMixin:
    """``get_proportions``, ``get_signature`` and what they write on the bulk AnnData."""

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
        """Estimate cell-type proportions of bulk samples, optionally with 90 % intervals.

        Parameters
        ----------
        bulk
            Bulk samples (samples × genes) on a linear scale (raw counts, CPM or TPM): an
            AnnData, or a DataFrame with genes as columns (then only the returned DataFrame
            carries results). Genes are matched by name; extra genes are ignored. A bulk that
            lacks some of the model's genes is fitted on the selected genes it has (a warning
            above 10 % of them missing; an error below 3 a cell type). A bulk opened with
            ``anndata.read_h5ad(path, backed="r")`` is read and deconvolved a chunk of samples
            at a time, so memory stays bounded whatever its size (a progress bar in a terminal
            or notebook); the unknown fraction and the gene report are then each chunk's (the
            report: the first's). A bulk whose values are a Dask array (e.g. read lazily from
            zarr or h5ad) is deconvolved block by block of samples as Dask schedules it: its
            threaded scheduler, or the ``distributed`` client you have open; the proportions
            equal the in-memory ones, the unknown-content score is each block's, and intervals,
            ``use_states`` and ``unknown_share`` need the bulk in memory.
        layer
            Layer of ``bulk`` with the values; ``None`` uses ``bulk.X``.
        key_added
            Key of ``bulk.obsm`` for the proportions; the other keys written (Notes) share its
            prefix (``"model2"`` writes ``obs["model2_fit_score"]``): calls never overwrite.
        batch_size
            Samples per forward pass of the network; defaults to 1024.
        method
            ``"fit"`` (default): the network's output starts the robust fit of each sample to S
            (:meth:`estimator`; after :meth:`adapt`, the exact fit adapt made S with).
            ``"network"``: the deconvolution network's output as is.
        n_rounds
            Re-weighting rounds of the robust fit (the adapted fit is exact and ignores it).
        kind
            ``"cell"`` (default): fractions of cells; ``"rna"``: of the sample's RNA. With a
            registered count layer, cell fractions are RNA fractions over each type's RNA
            content (``rna_content_``), renormalised; without one both kinds are the same.
        n_draws
            Signature draws for 90 % intervals (0: none; 20 is a good default): S perturbed by
            its profiles' variation under the VAE posterior and refitted. Their standard
            deviation goes to ``obsm[key_added + "_std"]``, the intervals (scaled by
            ``interval_scale_``, calibrated once by :meth:`calibrate_uncertainty`) to
            ``obsm[key_added + "_lower"]`` and ``obsm[key_added + "_upper"]``.
        unknown_share
            The share of each sample's cells that the reference lacks, where you know it
            (tumour purity from histology, neutrophils from a blood count): an array (one
            value a sample), a Series indexed by ``bulk.obs_names`` or the name of a
            ``bulk.obs`` column; NaN where not measured. The result is then fractions of the
            whole sample, with an ``"unknown"`` column. Cell fractions are exact (the known
            types' fractions times ``1 - share``); RNA fractions need the unknown cells' RNA
            content (``unknown_content``). Unmeasured samples are read from
            ``obs["hpvade_unknown_lower_bound"]`` by a line fitted on the measured ones (at
            least 5), kept in ``uns["hpvade_unknown_map"]`` with its leave-one-out error and
            the cohort mean's; where the line does no better than the cohort mean, they get
            NaN rows and a warning. The reference alone cannot tell this share
            (docs page "Real bulk data").
        unknown_content
            RNA per unknown cell, relative to the mean of the reference types' contents
            (``kind="rna"`` with ``unknown_share`` only). Tumour cells often hold more
            (2 doubles the unknown RNA share a given cell share implies).
        use_states
            Fit the bulk with every cell state (:meth:`cell_states`) as a column of S, summed
            by type. Off by default: no gain on real bulk (docs page "The model and its losses").

        Returns
        -------
        DataFrame (samples × cell types); rows sum to 1. Also written to ``bulk.obsm[key_added]``.

        Notes
        -----
        Also written to ``bulk`` (keys for the default ``key_added``):

        - ``obs["hpvade_unknown_lower_bound"]``: content the reference's types do not
          explain (e.g. neutrophils in PBMC bulk against a PBMC reference), as a share of
          the sample's RNA: the expression in genes the fit falls far short of in at least
          half of the samples deconvolved together and that rise and fall together. It ranks
          the samples of one call (deconvolve a cohort in one call) and is a lower bound:
          the missing cells also express genes the known types explain, so it reads far
          below their share. Not a fraction to report: pass ``unknown_share`` for that.
          ``obs["hpvade_unknown_fraction"]``, its old name (in the units of ``kind``), is
          written until 0.4.
        - ``obs["hpvade_fit_score"]``: mean over genes of the squared difference between
          ``anscombe(p @ S.T)`` and ``anscombe(bulk)`` (0 = perfectly explained).
        - ``obs["hpvade_unexplained_score"]``: the same with only the expression that
          ``p @ S.T`` falls short of (positive residuals), and ``obs["hpvade_unexplained"]``:
          whether it exceeds ``unexplained_threshold_``, calibrated on pseudobulks from the
          reference (see :meth:`calibrate_unexplained`). A warning names how many samples are
          flagged.
        - ``uns["hpvade_gene_report"]``: reference genes found, missing, extra and all-zero;
          the fitted genes used and lacked; ``set_aside_genes``, those the robust fit set
          aside in at least half of the samples (protocol-distorted, or from missing cells).
        - ``uns["hpvade_estimator"]``: the fit that produced the proportions.
        """
        if kind not in ("cell", "rna"):
            raise ValueError(f'`kind` must be "cell" or "rna", got {kind!r}.')
        if method not in ("fit", "network"):
            raise ValueError(f'`method` must be "fit" or "network", got {method!r}.')
        rounds = n_rounds if method == "fit" else 0
        keys = result_keys(key_added)
        bulk = as_bulk_anndata(bulk)
        if is_dask_array(bulk.X if layer is None else bulk.layers[layer]):
            if n_draws or use_states or unknown_share is not None:
                raise ValueError(
                    "A Dask-backed bulk is deconvolved block by block with the default fit: "
                    "`n_draws`, `use_states` and `unknown_share` need it in memory "
                    "(`bulk = bulk.to_memory()`, or deconvolve a subset)."
                )
            return self._proportions_by_dask(bulk, layer, key_added, kind, rounds, batch_size)
        if bulk.isbacked:
            options = {"layer": layer, "key_added": key_added, "batch_size": batch_size,
                       "method": method, "n_rounds": n_rounds, "kind": kind,
                       "n_draws": n_draws, "use_states": use_states}  # fmt: skip
            if unknown_share is not None:
                raise ValueError(
                    "`unknown_share` needs the bulk in memory (the map from the score to the "
                    "share is fitted on the whole cohort): load it with `bulk.to_memory()`."
                )
            return self._proportions_by_chunk(bulk, options)
        measured = None
        if unknown_share is not None:
            measured = measured_unknown_share(bulk, unknown_share, self.cell_types, UNKNOWN_COLUMN)
        cpm, found, report = self._bulk_cpm(bulk, layer, allow_missing=True)
        bulk.uns[keys["gene_report"]] = report
        estimator = self.estimator()  # the network's output starts its fit
        initial = self.module.predict_proportions(cpm, batch_size or DEFAULT_BATCH_SIZE)
        fit = estimator.fit(cpm, initial, rounds, found)
        if use_states:
            fit = self._state_aware_fit(cpm, fit, found)
        mixture = fit.proportions
        unknown_rna = estimator.unknown_share(cpm, fit, found)
        proportions, unknown = fractions_of_kind(mixture, kind, self.rna_content_, unknown_rna)
        if fit.set_aside is not None:  # fitted genes set aside in at least half the samples
            names = self.var_names[self._fit_gene_index(found)]
            report["set_aside_genes"] = [
                str(g) for g in names[fit.set_aside >= SET_ASIDE_REPORTED]
            ]
        result = pd.DataFrame(proportions, index=bulk.obs_names.copy(), columns=self.cell_types)
        bulk.obs[keys["unknown_lower_bound"]] = np.clip(unknown_rna, 0.0, 1.0)
        bulk.obs[keys["unknown_fraction"]] = unknown
        if measured is not None:
            result = self._whole_sample(
                bulk, result, unknown_rna, measured, unknown_content, kind, keys
            )
        bulk.obsm[key_added] = result
        bulk.uns[keys["estimator"]] = self._estimator_report(estimator, rounds, use_states)
        scores = sample_scores(bulk_reconstruction_error, cpm, mixture, estimator.signature)
        bulk.obs[keys["fit_score"]] = scores
        self._flag_unexplained(bulk, cpm, mixture, estimator.signature, keys)
        if n_draws > 0:
            self._write_intervals(bulk, cpm, mixture, kind, key_added, n_draws, rounds, found)
            if measured is not None:  # the known types' intervals, as fractions of the whole
                known = result.loc[:, self.cell_types].sum(axis=1).to_numpy()
                for end in ("std", "lower", "upper"):
                    bulk.obsm[f"{key_added}_{end}"] = bulk.obsm[f"{key_added}_{end}"].mul(
                        known, axis=0
                    )
        logger.info("Deconvolved %d samples (%s fractions).", bulk.n_obs, kind)
        return result

    # ------------------------------------------------------------------------------ helpers
    def _estimator_report(self, estimator, rounds: int, use_states: bool) -> dict:
        return {
            "estimator": estimator.name if rounds > 0 else "network",
            "adapted": self.gene_weights_ is not None,
            "n_rounds": int(rounds),
            "use_states": bool(use_states),
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

    def _whole_sample(self, bulk, known, score, measured, content, kind, keys) -> pd.DataFrame:
        """Fractions of the whole sample, with the ``"unknown"`` column (see
        :func:`hpvade.core.unknown_cell_shares` for the unmeasured samples)."""
        share, fitted = unknown_cell_shares(score, measured)
        if fitted is not None:
            bulk.uns[keys["unknown_map"]] = fitted.as_dict()
        values = whole_sample_fractions(known.to_numpy(), share, kind, self.rna_content_, content)
        return pd.DataFrame(values, index=known.index, columns=[*self.cell_types, UNKNOWN_COLUMN])

    def _flag_unexplained(self, bulk: AnnData, cpm, mixture, signature, keys: dict) -> None:
        score = sample_scores(unexplained_expression, cpm, mixture, signature)
        bulk.obs[keys["unexplained_score"]] = score
        if self.unexplained_threshold_ is None:
            logger.info("The unexplained-sample flag is not calibrated: no flag written.")
            return
        flagged = score > self.unexplained_threshold_
        bulk.obs[keys["unexplained"]] = flagged
        self._warn_if_unexplained(flagged, keys)

    def _warn_if_unexplained(self, flagged: np.ndarray, keys: dict[str, str]) -> None:
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
                # past this helper, its caller, get_proportions and its keyword wrapper
                stacklevel=settings.warnings_stacklevel + 3,
            )

    def _write_intervals(self, bulk, cpm, mixture, kind, key_added, n_draws, n_rounds, found):
        if self.interval_scale_ is None:
            logger.info("Calibrating the intervals (first call with draws).")
            self.calibrate_uncertainty()
        if self.signature_ratios_ is not None and n_draws <= len(self.signature_ratios_):
            ratios = self.signature_ratios_[:n_draws].astype(float)  # drawn at calibration
        else:
            ratios = self.signature_draws(n_draws, seed=settings.seed or 0)
        n_rounds = min(max(n_rounds, 1), DRAW_ROUNDS)
        draws = self.estimator().draws(cpm, mixture, ratios, n_rounds, found)
        none = np.zeros(len(mixture))
        draws = np.stack([fractions_of_kind(d, kind, self.rna_content_, none)[0] for d in draws])
        estimate = fractions_of_kind(mixture, kind, self.rna_content_, none)[0]
        lower, upper = interval(estimate, draws, self.interval_scale_)
        index, columns = bulk.obs_names.copy(), self.cell_types
        bulk.obsm[f"{key_added}_std"] = pd.DataFrame(draws.std(axis=0), index, columns)
        bulk.obsm[f"{key_added}_lower"] = pd.DataFrame(lower, index, columns)
        bulk.obsm[f"{key_added}_upper"] = pd.DataFrame(upper, index, columns)

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
        results = self._dask_results(bulk, layer, kind, n_rounds, None)[1]
        results.to_zarr(store, component="results", overwrite=True)
        columns = [*self.cell_types, *BLOCK_SCORES]
        zarr.open_array(store, path="results", mode="r+").attrs["columns"] = columns

    def _dask_results(self, bulk, layer, kind, rounds, batch_size):
        """The block deconvolution of a Dask-backed bulk and its lazy results."""
        found = np.asarray(self.var_names.isin(bulk.var_names))
        if not found.all():
            self._check_missing_genes(bulk, found)
        block = BlockDeconvolution(
            self.module, self.estimator(), bulk.var_names, self.var_names, rounds, kind,
            self.rna_content_, batch_size or DEFAULT_BATCH_SIZE,
        )  # fmt: skip
        return block, block.over(get_matrix(bulk, layer))

    def _proportions_by_dask(self, bulk, layer, key_added, kind, rounds, batch_size):
        """A bulk whose values are a Dask array: each block of samples is deconvolved by
        :class:`~hpvade.core.BlockDeconvolution` as Dask schedules it (its threaded scheduler,
        or the user's ``distributed`` client); only the results come back."""
        block, lazy = self._dask_results(bulk, layer, kind, rounds, batch_size)
        n_types = len(self.cell_types)
        results = np.asarray(lazy.compute())
        keys = result_keys(key_added)
        result = pd.DataFrame(results[:, :n_types], bulk.obs_names.copy(), self.cell_types)
        bulk.obsm[key_added] = result
        for j, name in enumerate(BLOCK_SCORES):
            bulk.obs[keys[name]] = results[:, n_types + j]
        if self.unexplained_threshold_ is not None:
            flagged = bulk.obs[keys["unexplained_score"]].to_numpy() > self.unexplained_threshold_
            bulk.obs[keys["unexplained"]] = flagged
            self._warn_if_unexplained(flagged, keys)
        bulk.uns[keys["estimator"]] = self._estimator_report(block.estimator, rounds, False)
        logger.info("Deconvolved %d samples in %d blocks.", bulk.n_obs, lazy.numblocks[0])
        return result

    def _proportions_by_chunk(self, bulk: AnnData, options: dict) -> pd.DataFrame:
        """A backed bulk (``anndata.read_h5ad(path, backed="r")``), ``BACKED_CHUNK_VALUES``
        values at a time: each chunk of samples is read into memory and deconvolved as an
        in-memory bulk, and only its results are kept, so memory stays bounded whatever the
        cohort's size. The cohort statistics (the unknown fraction's genes, the gene report)
        are those of each chunk (the report: of the first)."""
        keys = result_keys(options["key_added"])
        per_chunk = max(1, BACKED_CHUNK_VALUES // max(bulk.n_vars, 1))
        obs, obsm, uns, flagged = [], {}, {}, []
        starts = range(0, bulk.n_obs, per_chunk)
        bar = not interactive_output() or len(starts) < 2  # disabled: one chunk, or a log file
        for start in track(starts, description="Deconvolving chunks", disable=bar):
            part = bulk[start : start + per_chunk].to_memory()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.get_proportions(part, **options)
            for warning in caught:  # the others once; the unexplained warning for all below
                if "not explained by the reference" not in str(warning.message):
                    stacklevel = settings.warnings_stacklevel + 2  # the user's line
                    warnings.warn(warning.message, warning.category, stacklevel=stacklevel)
            written = [k for k in keys.values() if k in part.obs]
            obs.append(part.obs[written])
            added = options["key_added"]
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
            self._warn_if_unexplained(np.concatenate(flagged), keys)
        return bulk.obsm[options["key_added"]].copy()
