"""Activation patching: how much patching each (layer, position) moves a metric.

Invariant: the image is the effect as given (no rescaling), coloured by a diverging map
centred at zero and symmetric (±max |effect|), so equal and opposite effects get equally
strong colours and zero is white.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ._heatmap import heatmap
from ._values import as_tensor, layer_labels, token_labels


def patching_heatmap(
    effect: Any,
    tokens: Sequence[str] | Sequence[int] | torch.Tensor | str | None = None,
    layers: Sequence[int | str] | None = None,
    tokenizer: Any = None,
    title: str = "activation patching",
    metric: str = "effect",
    annotate: bool = False,
    cmap: str = "RdBu_r",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Layer x position heatmap of `effect[layers, positions]`.

    effect: a tensor, or a list (one per layer) of per-position tensors or numbers, saved
    values included. metric names the colourbar (e.g. "logit difference recovered");
    annotate writes each cell's value in it.
    """
    x = as_tensor(effect, "patching_heatmap")
    if x.dim() != 2:
        raise ValueError(f"patching_heatmap: got shape {tuple(x.shape)}; expected [layers, positions]")
    n_layers, n_positions = x.shape
    finite = x[torch.isfinite(x)]
    limit = float(finite.abs().max()) if finite.numel() else 0.0
    limit = limit or 1.0  # all zero: any symmetric range draws it white
    text = [[f"{v:.2g}" for v in row] for row in x.tolist()] if annotate else None
    return heatmap(
        x.numpy(),
        xlabels=token_labels(tokens, tokenizer, n_positions, "patching_heatmap"),
        ylabels=layer_labels(layers, n_layers, "patching_heatmap"),
        xlabel="position (patched token)",
        ylabel="layer",
        title=title,
        cmap=cmap,
        norm=Normalize(-limit, limit),
        colorbar_label=metric,
        cell_text=text,
        lower=True,
        figsize=figsize,
    )
