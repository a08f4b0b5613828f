"""The house style shared by every figure (seaborn), so the report reads as one document, and small figure helpers."""

from __future__ import annotations

from typing import Literal

import numpy as np

PALETTE = {
    "absent features": "#c7d7ea",
    "linear error": "#4c78a8",
    "nonlinear error": "#e45756",
    "total": "#333333",
    "pursuit": "#72b7b2",
}
FIGSIZE = (6.4, 4.0)


def apply_style() -> None:
    """Seaborn 'whitegrid' with a readable font size at report width (figures are shown ~640 px wide)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    mpl.rcParams.update({"figure.figsize": FIGSIZE, "axes.titleweight": "bold", "savefig.facecolor": "white"})


def new_figure(**kwargs):
    """A figure and axes in the house size."""
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=kwargs.pop("figsize", FIGSIZE), **kwargs)


def note_figure(title: str, note: str):
    """A placeholder figure that says why there is nothing to plot (the runner never crashes on thin data)."""
    fig, ax = new_figure()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return fig


def log2_ticks(ax, axis: Literal["x", "y"], values: np.ndarray) -> None:
    """Ticks at the measured values of a log2-scaled axis, labelled in plain numbers (1024, not 2^10)."""
    vals = np.unique(np.asarray(values, dtype=np.float64))
    vals = vals[np.isfinite(vals) & (vals > 0)]
    ticks, labels = np.log2(vals), [f"{v:g}" for v in vals]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, labels)


def mathtext_safe(text: str) -> str:
    """Token text as a tick label: '$' would start matplotlib mathtext, control characters would break lines."""
    return text.replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t")
