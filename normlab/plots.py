"""The book's shared matplotlib style and colours, so a norm has the same colour in every chapter."""

from __future__ import annotations

import matplotlib as mpl

# One colour per normalization, used by every figure of the book.
NORM_COLORS = {
    "none": "#7f7f7f",
    "bn": "#1f77b4",
    "batchnorm": "#1f77b4",
    "ln": "#ff7f0e",
    "layernorm": "#ff7f0e",
    "gn": "#2ca02c",
    "groupnorm": "#2ca02c",
    "in": "#9467bd",
    "instancenorm": "#9467bd",
    "rms": "#d62728",
    "rmsnorm": "#d62728",
    "wn": "#8c564b",
    "ws": "#e377c2",
    "nf": "#17becf",
}


def use_book_style() -> None:
    """Readable defaults for the rendered book (PNG output; nbval does not compare PNGs)."""
    mpl.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 100,
        "figure.figsize": (7.0, 3.6),
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        "font.size": 10,
    })


def color(norm: str) -> str:
    return NORM_COLORS.get(norm.lower(), "#333333")
