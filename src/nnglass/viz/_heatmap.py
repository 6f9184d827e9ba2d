"""One heatmap drawer shared by the logit lens, activation patching and attention plots.

Invariant: the figure is a plain `matplotlib.figure.Figure` built with the object API
(no pyplot, so no global state: safe headless, in threads and on servers; Jupyter shows a
Figure inline by itself). Its first axes hold exactly one image whose array is the data
as given (row 0 = first row of the data), tick labels are the given labels verbatim
(mathtext off, so a "$" token stays a "$"), the colourbar is the figure's second axes,
and cell texts, when asked for, are the axes' only texts, one per cell, row-major.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

_CELL_FONT = 8  # points
_TICK_FONT = 9


def _longest(labels: Sequence[str]) -> int:
    return max((len(s) for s in labels), default=1)


def _figsize(rows: int, cols: int, xlabels: Sequence[str], ylabels: Sequence[str],
             cell_text: Sequence[Sequence[str]] | None) -> tuple[float, float]:
    # Cells wide enough for their text at _CELL_FONT (about 0.075 in per character);
    # constrained layout then finds the margins for tick labels and the colourbar.
    lines, chars = 1, 1
    if cell_text is not None:
        for row in cell_text:
            for s in row:
                parts = s.split("\n")
                lines, chars = max(lines, len(parts)), max(chars, *(len(p) for p in parts))
    cell_w = min(1.4, max(0.4, 0.16 + 0.075 * max(chars, min(_longest(xlabels), 6))))
    cell_h = max(0.32, 0.14 + 0.16 * lines)
    width = cols * cell_w + 1.6 + 0.07 * _longest(ylabels)
    height = rows * cell_h + 1.3 + (0.07 * _longest(xlabels) if _longest(xlabels) > 3 else 0)
    return min(width, 40.0), min(height, 40.0)


def _ink(rgba: tuple[float, ...]) -> str:
    """Black text on light cells, white on dark (relative luminance, ITU-R BT.709)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def heatmap(
    data: np.ndarray,
    *,
    xlabels: Sequence[str],
    ylabels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    cmap: str | Colormap,
    norm: Normalize,
    colorbar_label: str,
    cell_text: Sequence[Sequence[str]] | None = None,
    lower: bool = False,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """`data[rows, cols]` as an image; `lower` puts row 0 at the bottom (layers grow upward)."""
    rows, cols = data.shape
    fig = Figure(figsize=figsize or _figsize(rows, cols, xlabels, ylabels, cell_text), layout="constrained")
    ax = fig.add_subplot()
    # Masked cells (future keys) in light grey: they read as "not there", not as zero.
    cmap = (colormaps[cmap] if isinstance(cmap, str) else cmap).with_extremes(bad="#eeeeee")
    origin = "lower" if lower else "upper"
    image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", origin=origin)
    rotate = _longest(xlabels) > 3
    ax.set_xticks(
        range(cols),
        list(xlabels),
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
        fontsize=_TICK_FONT,
        parse_math=False,
    )
    ax.set_yticks(range(rows), list(ylabels), fontsize=_TICK_FONT, parse_math=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, parse_math=False)
    bar = fig.colorbar(image, ax=ax, shrink=0.9 if rows > 3 else 1.0)
    bar.set_label(colorbar_label)
    if cell_text is not None:
        _annotate(ax, data, cell_text, image)
    return fig


def _annotate(ax: Any, data: np.ndarray, cell_text: Sequence[Sequence[str]], image: Any) -> None:
    colours = image.to_rgba(np.ma.masked_invalid(data))
    for i, row in enumerate(cell_text):
        for j, text in enumerate(row):
            ink = _ink(tuple(colours[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=_CELL_FONT, color=ink, parse_math=False)
