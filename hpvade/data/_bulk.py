"""Bring a user's bulk AnnData onto the reference genes in linear CPM space."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from hpvade._constants import CPM_SCALE, GENE_REPORT_KEY
from hpvade.data._matrix import check_finite_non_negative, cpm_rows, get_matrix

#: Non-integer data whose maximum stays below this is taken as log-transformed.
#: log1p(1e6) ≈ 13.8 and log2(1e6 + 1) ≈ 19.9, while linear counts or CPM of any real
#: sample reach thousands.
LOG_SCALE_MAX = 50.0

logger = logging.getLogger(__name__)


def looks_log_transformed(values: np.ndarray) -> bool:
    """True for non-integer data whose maximum is below what linear expression reaches."""
    if values.size == 0 or float(values.max()) >= LOG_SCALE_MAX:
        return False
    return not np.allclose(values, np.round(values))


#: Gene identifiers of this form are Ensembl IDs (ENSG..., ENSMUSG..., with an optional
#: version suffix); anything else is taken as a symbol.
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def _identifier_kind(names: pd.Index) -> str:
    """``"Ensembl IDs (versioned)"``, ``"Ensembl IDs"`` or ``"gene symbols"``: what most of a
    sample of ``names`` are."""
    sample = [str(n) for n in names[:500]]
    if not sample:
        return "gene symbols"
    ensembl = [n for n in sample if _ENSEMBL.match(n)]
    if len(ensembl) < len(sample) / 2:
        return "gene symbols"
    versioned = sum("." in n for n in ensembl) > len(ensembl) / 2
    return "Ensembl IDs (versioned)" if versioned else "Ensembl IDs"


def gene_mismatch_hint(bulk: AnnData, genes: pd.Index) -> str:
    """Why a bulk shares few of ``genes``, where it can be told: the bulk is genes × samples
    (its obs_names hold the genes), it names them in another case (``cd3d`` for ``CD3D``),
    or another way (Ensembl IDs against symbols, versioned against unversioned). Empty when
    none of these."""
    in_var = genes.isin(bulk.var_names).sum()
    if genes.isin(bulk.obs_names).sum() > max(in_var, 0.1 * len(genes)):
        return (
            " The bulk looks transposed: its obs_names (rows) hold the reference's genes. "
            "Pass samples as rows and genes as columns: `bulk = bulk.T.copy()` for an AnnData, "
            "`table.T` for a DataFrame."
        )
    ours_upper = pd.Index(genes.astype(str).str.upper())
    theirs_upper = pd.Index(bulk.var_names.astype(str).str.upper())
    in_any_case = ours_upper.isin(theirs_upper)
    if in_any_case.sum() > max(2 * in_var, 0.1 * len(genes)):
        matched = genes[in_any_case][0]
        theirs = bulk.var_names[theirs_upper == matched.upper()][0]
        return (
            f" The bulk names the reference's genes in another case (e.g. {theirs!r} for "
            f"{matched!r}): use the reference's names, e.g. `bulk.var_names = "
            "bulk.var_names.str.upper()` for human symbols (or map them with your pipeline's "
            "gene annotation)."
        )
    ours, theirs = _identifier_kind(genes), _identifier_kind(bulk.var_names)
    if ours != theirs:
        example_ours, example_theirs = genes[0], bulk.var_names[0]
        return (
            f" The bulk's genes are {theirs} (e.g. {example_theirs!r}) and the reference's "
            f"{ours} (e.g. {example_ours!r}): map both to one kind first"
            + (
                " (strip the version suffix: `bulk.var_names = bulk.var_names.str.split('.')"
                ".str[0]`)."
                if {ours, theirs} == {"Ensembl IDs", "Ensembl IDs (versioned)"}
                else ", e.g. with the gene annotation of your bulk's pipeline."
            )
        )
    return ""


def on_signature_scale(cpm: np.ndarray, signature: np.ndarray, found: np.ndarray) -> None:
    """Put a bulk's CPM, taken over the genes it has (``found``), on the scale of a signature's
    CPM over all its genes (in place): times the mean share of those genes in S's columns."""
    if not found.all():
        cpm *= float((signature[found].sum(axis=0) / CPM_SCALE).mean())


def as_bulk_anndata(bulk) -> AnnData:
    """``bulk`` as AnnData: an AnnData as is; a DataFrame (samples × genes, as Scaden, TAPE and
    most tables arrive) wrapped, genes from its columns; anything else refused with the fix."""
    if isinstance(bulk, AnnData):
        return bulk
    if isinstance(bulk, pd.DataFrame):
        if not all(pd.api.types.is_numeric_dtype(t) for t in bulk.dtypes):
            raise TypeError(
                "The bulk DataFrame must hold numbers only (samples as rows, genes as columns); "
                "move sample annotations out of it first."
            )
        return AnnData(
            bulk.to_numpy(dtype=np.float64),
            obs=pd.DataFrame(index=bulk.index.astype(str)),
            var=pd.DataFrame(index=bulk.columns.astype(str)),
        )
    raise TypeError(
        f"`bulk` must be an AnnData or a pandas DataFrame (samples × genes), got "
        f"{type(bulk).__name__}. Wrap an array with its gene names: "
        "`bulk = anndata.AnnData(values, var=pd.DataFrame(index=gene_names))`."
    )


def gene_report(
    bulk: AnnData, genes: pd.Index, cpm: np.ndarray, selected: pd.Index | None = None
) -> dict:
    """How the bulk's genes met the reference's: found, missing, ignored, all-zero, used.

    Parameters
    ----------
    bulk
        The bulk AnnData.
    genes
        The reference genes (the model's ``var_names``).
    cpm
        The bulk's CPM over ``genes`` (samples × genes), from :func:`bulk_to_cpm`.
    selected
        The genes the proportion fit uses (the model's ``selected_genes_``).

    Returns
    -------
    A JSON-friendly dict: ``n_reference_genes``, ``n_found``, ``missing_genes`` (reference genes
    the bulk lacks), ``n_extra_ignored`` and ``extra_genes_example`` (bulk genes the reference
    does not have), ``all_zero_genes`` (reference genes that are zero in every bulk sample),
    ``n_selected`` and ``used_genes`` (selected genes the bulk has: the genes the fit used) and
    ``selected_missing`` (selected genes the bulk lacks).
    """
    extra = bulk.var_names.difference(genes, sort=False)
    zero = genes[cpm.sum(axis=0) <= 0]
    if selected is not None:
        used = selected[selected.isin(bulk.var_names)]
        selection = {
            "n_selected": int(len(selected)),
            "used_genes": [str(g) for g in used],
            "selected_missing": [str(g) for g in selected.difference(bulk.var_names)],
        }
    else:
        selection = {}
    return {
        **selection,
        "n_reference_genes": int(len(genes)),
        "n_found": int(genes.isin(bulk.var_names).sum()),
        "missing_genes": [str(g) for g in genes.difference(bulk.var_names)],
        "n_extra_ignored": int(len(extra)),
        "extra_genes_example": [str(g) for g in extra[:10]],
        "n_all_zero": int(len(zero)),
        "all_zero_genes": [str(g) for g in zero],
    }


def bulk_to_cpm(
    bulk: AnnData, genes: pd.Index, layer: str | None = None, allow_missing: bool = False
) -> np.ndarray:
    """Return the bulk samples' CPM over ``genes`` (samples × genes, float64).

    Genes are matched by name (extra bulk genes are ignored) and the matched counts are
    CPM-normalised, so raw counts, CPM and TPM all give the same result. With
    ``allow_missing``, genes the bulk lacks are 0 and the CPM is over the genes it has.

    Raises
    ------
    ValueError
        Reference genes are missing (unless ``allow_missing``), values are log-scale,
        negative or non-finite, or a sample has no counts on the reference genes.
    """
    if not bulk.var_names.is_unique:
        dup = bulk.var_names[bulk.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"Bulk var_names are not unique (e.g. {dup}). Sum or drop duplicated genes first, "
            "e.g. `bulk = bulk[:, ~bulk.var_names.duplicated()].copy()`."
        )
    missing = genes.difference(bulk.var_names)
    if len(missing) > 0 and not allow_missing:
        raise ValueError(
            f"{len(missing)} of {len(genes)} reference genes are missing from the bulk "
            f"(e.g. {missing[:5].tolist()}). Restrict the reference to shared genes before "
            "setup: `ref = ref[:, ref.var_names.isin(bulk.var_names)].copy()`, then "
            "`HPVADE.setup_anndata(ref, ...)` and train again." + gene_mismatch_hint(bulk, genes)
        )
    columns = bulk.var_names.get_indexer(genes)
    found = columns >= 0
    matrix = get_matrix(bulk, layer)
    if not np.array_equal(columns, np.arange(bulk.n_vars)):
        matrix = matrix[:, columns[found]]
    found_values = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    # always a copy: the user's data is never modified
    if found.all():  # one allocation: a fresh large array costs its first touch once
        values = np.array(found_values, dtype=np.float64)
    else:
        values = np.zeros((bulk.n_obs, len(genes)), dtype=np.float64)
        values[:, found] = found_values
    where = f"`bulk.layers[{layer!r}]`" if layer else "`bulk.X`"
    check_finite_non_negative(
        values, where, "pass linear-scale counts, CPM or TPM, not centred or scaled data."
    )
    if looks_log_transformed(values):
        raise ValueError(
            f"{where} looks log-transformed (non-integer values, max {values.max():.3g} < "
            f"{LOG_SCALE_MAX:g}). Deconvolution mixes in linear space: pass raw counts, CPM or "
            "TPM, e.g. `np.expm1(x)` for log1p data."
        )
    zero = np.flatnonzero(values.sum(axis=1) <= 0)
    if zero.size:
        raise ValueError(
            f"{zero.size} bulk samples have no counts on the reference genes "
            f"(e.g. {bulk.obs_names[zero[:5]].tolist()}); remove them before deconvolution."
            + gene_mismatch_hint(bulk, genes)
        )
    return cpm_rows(values, inplace=True)


def measured_unknown_share(bulk: AnnData, share, cell_types, column: str) -> np.ndarray:
    """The user's share of each sample's cells that the reference lacks, as an array
    aligned with ``bulk.obs_names`` (NaN: not measured)."""
    if isinstance(share, str):
        if share not in bulk.obs:
            raise KeyError(f"`unknown_share={share!r}` is not a column of `bulk.obs`.")
        share = bulk.obs[share]
    if isinstance(share, pd.Series):
        missing = bulk.obs_names.difference(share.index)
        if len(missing):
            raise ValueError(
                f"`unknown_share` has no value for {len(missing)} samples (e.g. "
                f"{list(missing[:3])}); index it by `bulk.obs_names`, NaN where not measured."
            )
        share = share.reindex(bulk.obs_names)
    values = np.asarray(share, dtype=float).ravel()
    if values.size != bulk.n_obs:
        raise ValueError(
            f"`unknown_share` has {values.size} values for {bulk.n_obs} samples: pass one "
            "a sample (NaN where not measured), a Series indexed by `bulk.obs_names` or "
            "the name of a `bulk.obs` column."
        )
    if ((values < 0) | (values > 1)).any():
        raise ValueError(
            "`unknown_share` is the share of each sample's cells that the reference lacks: "
            "between 0 and 1 (tumour cells at a purity of 70 percent: 0.7), NaN where not "
            "measured."
        )
    if column in cell_types:
        raise ValueError(
            f"A cell type of the reference is named {column!r}, the column "
            "`unknown_share` adds: rename it in the reference's labels."
        )
    return values


#: A bulk may lack this share of the fit genes before a warning (the fit uses the rest).
MISSING_SELECTED_WARN = 0.1
#: Fewest fit genes a bulk must have, per cell type, to be deconvolved.
MIN_FIT_GENES_PER_TYPE = 3


@dataclass(frozen=True)
class PreparedBulk:
    """A bulk as every path that takes one sees it (:func:`prepare_bulk`).

    Attributes
    ----------
    cpm
        CPM on the model's genes (samples × genes; genes the bulk lacks are 0), on the
        signature's scale.
    found
        Which of the model's genes the bulk has.
    report
        How its genes met the model's (:func:`gene_report`; written to ``uns`` by
        ``get_proportions``).
    """

    cpm: np.ndarray
    found: np.ndarray
    report: dict


def prepare_bulk(
    bulk: AnnData,
    layer: str | None,
    genes: pd.Index,
    signature: np.ndarray,
    fit_genes: np.ndarray,
    selected: pd.Index | None,
    stacklevel: int = 2,
    written: bool = True,
) -> PreparedBulk:
    """The checks and the CPM every model path that takes a bulk shares: the genes' names
    first, then their values.

    Parameters
    ----------
    bulk
        Bulk samples (an AnnData; not a view, since results are written to it).
    layer
        Layer with the values; ``None``: ``X``.
    genes, signature, fit_genes
        The model's genes, its served S (genes × types) and which genes the fit uses.
    selected
        The model's selected genes, in their order (for the report; ``None``: all).
    stacklevel
        Of the warning on missing fit genes, counted from this function (2: its caller).
    written
        Whether results will be written to ``bulk`` (then a view is refused).
    """
    if written and bulk.is_view:
        raise ValueError(
            "`bulk` is a view of another AnnData; results are written to its obsm and obs. "
            "Pass a copy: `bulk = bulk[mask].copy()`."
        )
    found = np.asarray(genes.isin(bulk.var_names))
    if not found.all():
        check_fit_genes(bulk, genes, fit_genes, found, signature.shape[1], stacklevel + 1)
    cpm = bulk_to_cpm(bulk, genes, layer, allow_missing=True)
    report = gene_report(bulk, genes, cpm, selected)
    on_signature_scale(cpm, signature, found)
    logger.info(
        "Genes: %d of %d reference genes found, %d extra bulk genes ignored, %d reference "
        "genes zero in every sample.",
        report["n_found"],
        report["n_reference_genes"],
        report["n_extra_ignored"],
        report["n_all_zero"],
    )
    return PreparedBulk(cpm, found, report)


def check_fit_genes(
    bulk: AnnData,
    genes: pd.Index,
    fit_genes: np.ndarray,
    found: np.ndarray,
    n_types: int,
    stacklevel: int = 2,
) -> None:
    """Refuse a bulk with fewer than ``MIN_FIT_GENES_PER_TYPE`` fit genes a type (naming the
    likely fix); warn when it lacks more than ``MISSING_SELECTED_WARN`` of them."""
    n_selected = int(fit_genes.sum())
    n_used = int((fit_genes & found).sum())
    needed = MIN_FIT_GENES_PER_TYPE * n_types
    if n_used < needed:
        raise ValueError(
            f"The bulk has {n_used} of the model's {n_selected} selected genes; at least "
            f"{needed} ({MIN_FIT_GENES_PER_TYPE} a cell type) are needed. The model's genes "
            f"are e.g. {genes[:3].tolist()}, the bulk's var_names e.g. "
            f"{bulk.var_names[:3].tolist()}."
            + (
                gene_mismatch_hint(bulk, genes)
                or " Name the bulk's genes as the reference's are, or train a model on the "
                "genes the bulk has."
            )
        )
    if n_used < (1 - MISSING_SELECTED_WARN) * n_selected:
        warnings.warn(
            f"The bulk lacks {n_selected - n_used} of the model's {n_selected} selected genes "
            f'(see bulk.uns["{GENE_REPORT_KEY}"]["selected_missing"]); the proportions are '
            "fitted on the rest.",
            UserWarning,
            stacklevel=stacklevel,
        )
