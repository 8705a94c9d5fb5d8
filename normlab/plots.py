"""The book's shared matplotlib style and colours, so a norm has the same colour in every chapter."""

from __future__ import annotations

import matplotlib as mpl

from .norms import canonical_norm_name

# One colour per canonical normalization name (`normlab.norms.NORM_NAMES`), used by every figure of the
# book; the BatchNorm variants share BatchNorm's hue, scaled WS shares the normalizer-free one.
NORM_COLORS = {
    "none": "#7f7f7f",
    "bn": "#1f77b4",
    "gbn": "#aec7e8",
    "brn": "#17456b",
    "sbn": "#3a5f8a",
    "ln": "#ff7f0e",
    "rms": "#d62728",
    "gn": "#2ca02c",
    "in": "#9467bd",
    "wn": "#8c564b",
    "ws": "#e377c2",
    "sws": "#9edae5",
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
    """The colour of a norm name (canonical, or a spelling recorded results use); dark grey otherwise."""
    try:
        return NORM_COLORS[canonical_norm_name(norm.lower())]
    except ValueError:
        return "#333333"
