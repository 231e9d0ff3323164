"""Checks on a reference before it is registered."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scvi import REGISTRY_KEYS

from hpvade.data._matrix import check_finite_non_negative, iter_row_chunks

#: log1p-normalised data stays well below this; raw counts routinely exceed it.
LOG1P_MAX = 20.0


def _values(block) -> np.ndarray:
    return block.data if sp.issparse(block) else np.asarray(block).ravel()


def validate_names(adata: AnnData) -> None:
    """Refuse duplicated cell or gene names: genes are matched by name."""
    for axis, names, fix in [
        ("var_names", adata.var_names, "adata.var_names_make_unique()"),
        ("obs_names", adata.obs_names, "adata.obs_names_make_unique()"),
    ]:
        if not names.is_unique:
            duplicated = names[names.duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"The reference's {axis} are not unique (e.g. {duplicated}); hpvade matches "
                f"genes and cells by name. Make them unique first, e.g. `{fix}`."
            )


def warn_on_sparse_types_genes_and_cells(
    adata: AnnData, codes: np.ndarray, categories, gene_totals, cell_totals
) -> None:
    """Warn about types with a single cell, genes never expressed, cells without counts."""
    sizes = np.bincount(codes, minlength=len(categories))
    single = [str(categories[t]) for t in np.flatnonzero(sizes == 1)]
    n_zero_genes, n_zero_cells = int((gene_totals == 0).sum()), int((cell_totals == 0).sum())
    problems = [
        (
            single,
            f"Cell types {single} have a single reference cell: their profiles rest on one "
            "cell and will be noisy. Merge or drop them if you can.",
        ),
        (
            n_zero_genes,
            f"{n_zero_genes} of {adata.n_vars} genes are zero in every reference cell; they "
            "carry no information. Consider `sc.pp.filter_genes(adata, min_cells=1)` before "
            "setup.",
        ),
        (
            n_zero_cells,
            f"{n_zero_cells} reference cells have zero counts; they add nothing to the "
            "signature. Consider `sc.pp.filter_cells(adata, min_counts=1)` before setup.",
        ),
    ]
    for found, message in problems:
        if found:
            warnings.warn(message, UserWarning, stacklevel=3)


def validate_reference(adata: AnnData, layer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Refuse duplicated names, negative or non-finite values, and data that is not log1p
    (raw counts, or normalised values that were not log-transformed).

    Reads the matrix in row chunks, so it works on large and backed references. Returns the
    per-gene and per-cell totals of the values it read.
    """
    validate_names(adata)
    where = f"`adata.layers[{layer!r}]`" if layer else "`adata.X`"
    all_integer, maximum = True, 0.0
    gene_totals = np.zeros(adata.n_vars)
    cell_totals = np.zeros(adata.n_obs)
    for start, stop, block in iter_row_chunks(adata, layer):
        gene_totals += np.asarray(block.sum(axis=0)).ravel()
        cell_totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        values = _values(block)
        if values.size == 0:
            continue
        check_finite_non_negative(
            values,
            where,
            "hpvade expects log1p-normalised expression "
            "(`sc.pp.normalize_total(adata); sc.pp.log1p(adata)`), not scaled data.",
        )
        maximum = max(maximum, float(values.max()))
        all_integer = all_integer and np.array_equal(values, np.round(values))
    if all_integer and maximum > 0:
        raise ValueError(
            f"{where} holds integer values (max {maximum:g}): it looks like raw counts, but "
            "hpvade expects log1p-normalised expression there (expm1 of counts overflows, and "
            "S would not be finite). Keep the counts in a layer and normalise: "
            "`adata.layers['counts'] = adata.X.copy(); sc.pp.normalize_total(adata); "
            "sc.pp.log1p(adata)`, then `setup_anndata(adata, ..., counts_layer='counts')`; or "
            "name a layer that already holds log1p values with `layer=`."
        )
    if maximum > LOG1P_MAX:
        raise ValueError(
            f"{where} reaches {maximum:g}, more than log1p-normalised data does: it looks "
            "normalised but not log-transformed (expm1 of it overflows). Apply "
            "`sc.pp.log1p(adata)` first, or name a layer that holds log1p values with `layer=`."
        )
    return gene_totals, cell_totals


def check_counts_layer(adata: AnnData, counts_layer: str | None) -> None:
    """Refuse a count layer with negative or non-finite values (no-op without one)."""
    if counts_layer is not None:
        _check_counts(adata, counts_layer)


def _check_counts(adata: AnnData, layer: str | None) -> None:
    where = f"`adata.layers[{layer!r}]`" if layer else "`adata.X`"
    for _, _, block in iter_row_chunks(adata, layer):
        check_finite_non_negative(_values(block), where, "it must hold non-negative raw counts.")


def resolve_counts_layer(
    layer: str | None, counts_layer: str | None, counts: bool
) -> tuple[str | None, bool]:
    """The ``pp`` functions' ``(layer to read, holds counts)``; ``counts=True`` is deprecated."""
    if counts:
        if counts_layer is not None:
            raise TypeError("Pass `counts_layer=` alone; `counts=True` is its deprecated form.")
        warnings.warn(
            "`counts=True` was replaced by `counts_layer=` in hpvade 0.2 (as in "
            "`HPVADE.setup_anndata`): pass `counts_layer=<the count layer>`. The old form "
            "stops working in 0.3.",
            FutureWarning,
            stacklevel=3,
        )
        return layer, True
    if counts_layer is not None:
        return counts_layer, True
    return layer, False


def validate_input(adata: AnnData, layer: str | None, counts: bool) -> None:
    """Boundary checks shared by the ``pp`` functions: names, then values for the data kind."""
    if counts:
        validate_names(adata)
        _check_counts(adata, layer)
    else:
        validate_reference(adata, layer)


def check_matches_registry(adata: AnnData, registry: dict) -> None:
    """Refuse an AnnData whose genes or labels differ from those a model was saved with."""
    fields = registry["field_registries"]
    genes = pd.Index(np.asarray(fields[REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]))
    if not adata.var_names.equals(genes):
        missing = genes.difference(adata.var_names)
        extra = adata.var_names.difference(genes)
        raise ValueError(
            f"The AnnData's genes differ from the saved model's ({len(genes)} genes): "
            f"{len(missing)} missing (e.g. {missing[:3].tolist()}), {len(extra)} extra "
            f"(e.g. {extra[:3].tolist()}){', or in another order' if not len(missing) else ''}. "
            "Load with the reference the model was trained on, or align it first: "
            "`genes = hpvade.HPVADE.load_registry(path)['field_registries']['X']"
            "['state_registry']['column_names']; adata = adata[:, genes].copy()`."
        )
    labels_key = registry["setup_args"]["labels_key"]
    known = set(
        np.asarray(fields[REGISTRY_KEYS.LABELS_KEY]["state_registry"]["categorical_mapping"])
    )
    if labels_key not in adata.obs:
        raise ValueError(
            f"The AnnData has no `obs[{labels_key!r}]`, the labels the model was trained with."
        )
    unknown = sorted(set(adata.obs[labels_key].astype(str).unique()) - known)
    if unknown:
        raise ValueError(
            f"`obs[{labels_key!r}]` holds cell types the saved model does not know: {unknown} "
            f"(model types: {sorted(known)}). Load with the reference the model was trained on."
        )
