"""Plotting functions in scanpy style.

Each function takes ``ax`` (draw into existing Axes), ``show`` (show the figure and return
``None``) and ``save`` (a path to write the figure to), and returns the Axes it drew on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from hpvade import metrics, tl
from hpvade._constants import LOSS_TERMS, PROPORTIONS_KEY

__all__ = ["predicted_vs_true", "proportions", "signature_heatmap", "training_history"]

#: Scale-check entries recorded on the first training batch (see ``HPVADE.scale_check_``).


def _finish(ax, show: bool | None, save: str | None):
    import matplotlib.pyplot as plt

    figure = ax[0].figure if isinstance(ax, list) else ax.figure
    if save:
        figure.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        plt.show()
        return None
    return ax


def _new_axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _colors(n: int):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def proportions(
    data: AnnData | pd.DataFrame,
    key: str = PROPORTIONS_KEY,
    sort_by: str | None = None,
    ax=None,
    title: str | None = None,
    show: bool | None = None,
    save: str | None = None,
):
    """Stacked bars: one bar per sample, one coloured segment per cell type.

    Parameters
    ----------
    data
        Bulk AnnData with proportions in ``obsm[key]`` (as written by
        :meth:`~hpvade.HPVADE.get_proportions`), or a samples × types DataFrame.
    key
        ``obsm`` key to read when ``data`` is an AnnData.
    sort_by
        Cell type whose proportion orders the samples (descending); ``None`` keeps the order.
    ax
        Axes to draw on; a new figure is made if ``None``.
    title
        Axes title.
    show
        Show the figure and return ``None``.
    save
        Path to save the figure to.

    Returns
    -------
    The matplotlib Axes (unless ``show``).
    """
    if isinstance(data, AnnData):
        if key not in data.obsm:
            raise KeyError(
                f"`obsm[{key!r}]` not found; run `model.get_proportions(bulk)` first "
                f"(obsm keys: {list(data.obsm)})."
            )
        data = data.obsm[key]
    frame = pd.DataFrame(data)
    if sort_by is not None:
        frame = frame.sort_values(sort_by, ascending=False)
    ax = _new_axes(ax, (max(4.0, 0.12 * len(frame) + 2.5), 3.5))
    positions = np.arange(len(frame))
    bottom = np.zeros(len(frame))
    for column, color in zip(frame.columns, _colors(frame.shape[1]), strict=True):
        values = frame[column].to_numpy(dtype=float)
        ax.bar(positions, values, bottom=bottom, width=0.9, color=color, label=str(column))
        bottom += values
    ax.set_xlim(-0.6, len(frame) - 0.4)
    ax.set_ylim(0, max(1.0, float(bottom.max()) if len(frame) else 1.0))
    ax.set_ylabel("proportion")
    ax.set_xlabel("sample")
    if len(frame) <= 40:
        ax.set_xticks(positions, frame.index.astype(str), rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return _finish(ax, show, save)


def _scatter_panel(ax, pred: pd.Series, true: pd.Series, color, label: str):
    ax.scatter(true, pred, s=6, alpha=0.6, color=color, label=label)
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")


def predicted_vs_true(
    pred: pd.DataFrame,
    true: pd.DataFrame,
    per_type: bool = False,
    ax=None,
    title: str | None = None,
    show: bool | None = None,
    save: str | None = None,
):
    """Predicted against true proportions, with Pearson r and RMSE in the titles.

    Parameters
    ----------
    pred, true
        Samples × types proportions; ``true`` is aligned to ``pred``'s index and columns.
    per_type
        One panel per cell type (r and RMSE of that type in its title) instead of one panel
        with all (sample, type) pairs coloured by type.
    ax
        Axes to draw on (a sequence of one Axes per type when ``per_type``); new ones are made
        if ``None``.
    title
        Title prefix (the metrics are appended); with ``per_type``, the figure's title.
    show
        Show the figure and return ``None``.
    save
        Path to save the figure to.

    Returns
    -------
    The Axes, or a list of Axes with ``per_type`` (unless ``show``).
    """
    import matplotlib.pyplot as plt

    true = true.loc[pred.index, pred.columns]
    colors = _colors(pred.shape[1])
    if not per_type:
        ax = _new_axes(ax, (4.5, 4.5))
        for column, color in zip(pred.columns, colors, strict=True):
            _scatter_panel(ax, pred[column], true[column], color, str(column))
        ax.set_xlabel("true proportion")
        ax.set_ylabel("predicted proportion")
        summary = f"r={metrics.pearson(pred, true):.3f}  RMSE={metrics.rmse(pred, true):.3f}"
        ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=9)
        ax.legend(fontsize=5, markerscale=2, loc="upper left", frameon=False)
        return _finish(ax, show, save)

    n = pred.shape[1]
    if ax is None:
        n_cols = min(n, 5)
        n_rows = int(np.ceil(n / n_cols))
        figure, grid = plt.subplots(
            n_rows, n_cols, figsize=(2.4 * n_cols, 2.6 * n_rows), squeeze=False
        )
        for extra in grid.ravel()[n:]:
            extra.remove()
        axes = list(grid.ravel()[:n])
    else:
        axes = list(ax) if isinstance(ax, Sequence | np.ndarray) else [ax]
        if len(axes) != n:
            raise ValueError(f"`ax` must hold one Axes per cell type ({n}), got {len(axes)}.")
        figure = axes[0].figure
    for panel, column, color in zip(axes, pred.columns, colors, strict=True):
        p, t = pred[column].to_numpy(float), true[column].to_numpy(float)
        _scatter_panel(panel, p, t, color, str(column))
        r, rmse = metrics.pearson(p, t), metrics.rmse(p, t)
        panel.set_title(f"{column}\nr={r:.2f}  RMSE={rmse:.3f}", fontsize=8)
        panel.tick_params(labelsize=6)
    axes[0].set_ylabel("predicted")
    axes[-1].set_xlabel("true")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _finish(axes, show, save)


def marker_genes(signature: pd.DataFrame, n_genes: int = 5) -> pd.Series:
    """Deprecated alias of :func:`hpvade.tl.signature_markers` (not a plot); removed in 0.3."""
    warnings.warn(
        "`hpvade.pl.marker_genes` moved to `hpvade.tl.signature_markers` (it is not a plot); "
        "the old name stops working in 0.3.",
        FutureWarning,
        stacklevel=2,
    )
    return tl.signature_markers(signature, n_genes)


def signature_heatmap(
    signature,
    n_genes: int = 5,
    ax=None,
    title: str | None = None,
    show: bool | None = None,
    save: str | None = None,
):
    """Heatmap of log10(1 + S) for the top marker genes of each type.

    Parameters
    ----------
    signature
        A genes × types DataFrame (e.g. from :func:`hpvade.pp.build_signature`) or a trained
        :class:`~hpvade.HPVADE` (its learned S).
    n_genes
        Marker genes per type (largest log fold change against the highest other type).
    ax
        Axes to draw on; a new figure is made if ``None``.
    title
        Axes title.
    show
        Show the figure and return ``None``.
    save
        Path to save the figure to.

    Returns
    -------
    The matplotlib Axes (unless ``show``).
    """
    if hasattr(signature, "get_signature"):
        signature = signature.get_signature()
    markers = tl.signature_markers(signature, n_genes)
    block = np.log10(1.0 + signature.loc[markers.index].to_numpy(dtype=float))
    ax = _new_axes(ax, (0.45 * signature.shape[1] + 2.5, 0.16 * len(markers) + 1.5))
    image = ax.imshow(block, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(np.arange(signature.shape[1]), signature.columns.astype(str), rotation=90)
    ax.set_yticks(np.arange(len(markers)), markers.index.astype(str), fontsize=6)
    ax.figure.colorbar(image, ax=ax, label="log10(1 + CPM)", shrink=0.6)
    ax.set_title(title or f"Signature: top {n_genes} marker genes per type", fontsize=9)
    return _finish(ax, show, save)


def training_history(
    model,
    terms: Sequence[str] = LOSS_TERMS,
    ax=None,
    title: str | None = None,
    show: bool | None = None,
    save: str | None = None,
):
    """Each loss term over epochs (training solid, validation dashed) and the scale check.

    Parameters
    ----------
    model
        A trained :class:`~hpvade.HPVADE`.
    terms
        Loss terms to draw (names as logged, without ``_train`` / ``_validation``).
    ax
        Axes to draw on; a new figure is made if ``None``.
    title
        Axes title; by default the first-batch scale check is summarised there.
    show
        Show the figure and return ``None``.
    save
        Path to save the figure to.

    Returns
    -------
    The matplotlib Axes (unless ``show``).
    """
    history = getattr(model, "history", None)
    if not history:
        raise ValueError("The model has no training history; train it first.")
    ax = _new_axes(ax, (5.5, 3.5))
    colors = _colors(len(terms))
    for term, color in zip(terms, colors, strict=True):
        for split, style in (("train", "-"), ("validation", "--")):
            key = f"{term}_{split}"
            if key in history and len(history[key]):
                series = history[key].iloc[:, 0].astype(float)
                ax.plot(series.index, series.to_numpy(), style, color=color, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    check = getattr(model, "scale_check_", None) or {}
    if title is None and check:
        title = (
            f"first-batch scale check: bulk {check.get('scale_bulk', float('nan')):.3g}, "
            f"p@S.T {check.get('scale_reconstruction', float('nan')):.3g}, "
            f"ratio {check.get('scale_ratio', float('nan')):.3f}"
        )
    if title:
        ax.set_title(title, fontsize=8)
    return _finish(ax, show, save)
