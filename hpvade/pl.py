"""Plotting functions (scanpy style: return Axes, take ``ax``, ``show``, ``save``)."""

from __future__ import annotations

import pandas as pd

from hpvade import metrics


def _finish(ax, show: bool | None, save: str | None):
    import matplotlib.pyplot as plt

    if save:
        ax.figure.savefig(save, dpi=150, bbox_inches="tight")
    if show:
        plt.show()
        return None
    return ax


def predicted_vs_true(
    pred: pd.DataFrame,
    true: pd.DataFrame,
    ax=None,
    title: str | None = None,
    show: bool | None = None,
    save: str | None = None,
):
    """Scatter of predicted against true proportions, coloured by type, r and RMSE in the title.

    Parameters
    ----------
    pred, true
        Samples × types proportions with matching index and columns.
    ax
        Axes to draw on; a new figure is made if ``None``.
    title
        Title prefix (the metrics are appended).
    show
        Show the figure and return ``None``.
    save
        Path to save the figure to.

    Returns
    -------
    The matplotlib Axes (unless ``show``).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    true = true.loc[pred.index, pred.columns]
    for column in pred.columns:
        ax.scatter(true[column], pred[column], s=6, alpha=0.6, label=str(column))
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true proportion")
    ax.set_ylabel("predicted proportion")
    summary = f"r={metrics.pearson(pred, true):.3f}  RMSE={metrics.rmse(pred, true):.3f}"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=9)
    ax.legend(fontsize=5, markerscale=2, loc="upper left", frameon=False)
    ax.set_aspect("equal")
    return _finish(ax, show, save)
