"""The house style shared by every figure (seaborn), so the report reads as one document."""

from __future__ import annotations

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
